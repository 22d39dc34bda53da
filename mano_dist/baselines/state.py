"""Eager optimizer state for the baselines: the same keys on every rank from construction on,
so DCP saves and loads them without a first step (see the Mano optimizer for the same rule)."""

from __future__ import annotations

import torch
from torch import Tensor


def init_param_state(state: dict, p: Tensor, index: int, *, matrix: bool, requirement: str, ok: bool) -> None:
    """A momentum buffer for a matrix algorithm, AdamW's ``step, exp_avg, exp_avg_sq`` for the
    fallback. ``ok`` says whether ``p`` has a shape the matrix algorithm accepts; if not, the
    error says what ``requirement`` is and where such a param belongs."""
    if matrix:
        if not ok:
            raise ValueError(f"{requirement}; param {index} has shape {tuple(p.shape)}: "
                             'put it in an "adamw" group (mano_param_groups(model) does this)')
        state.setdefault("momentum_buffer", torch.zeros_like(p))
    else:
        state.setdefault("step", torch.tensor(0.0))
        state.setdefault("exp_avg", torch.zeros_like(p))
        state.setdefault("exp_avg_sq", torch.zeros_like(p))
