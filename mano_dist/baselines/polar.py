"""The polar factor of a matrix by Newton-Schulz iteration, as Muon computes it.

The quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, from X0 = M / ||M||_F, run on the
wide orientation; coefficients (3.4445, -4.7750, 2.0315) and 5 steps are Muon's defaults, which
give singular values in roughly [0.7, 1.2] rather than exactly 1 (cheap and good enough for an
optimizer direction).
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(M: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> Tensor:
    a, b, c = coefficients
    X = M.reshape(M.shape[0], -1)
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    transpose = X.shape[0] > X.shape[1]
    if transpose:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if transpose:
        X = X.T
    return X.reshape(M.shape).to(M.dtype)
