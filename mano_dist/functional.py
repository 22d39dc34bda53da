"""Pure tensor math of Mano and of its AdamW fallback.

The Mano update of one matrix is written once, as a generator, against a *layout* (see
``layouts.py``) that knows how the local tensor maps onto the global matrix. Every per-slice
sum the update needs is *yielded* as a :class:`SliceSums` request holding this process's partial
sums; the driver (``lockstep.py``) completes the sums of all matrices at once (one all-reduce per
process group, or nothing when the reduced axis is local) and sends them back. So the same code
runs on a plain tensor, a DTensor shard and a fragment of a DeepSpeed flat partition.

Notation (``../shared/notes/algorithm.md``): ``W`` the weight viewed as (m, n), ``D`` the momentum
direction, ``k`` the reduced axis: ``k = 0`` makes every column unit-norm, ``k = 1`` every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator, Sequence

import torch
from torch import Tensor

VARIANTS = ("v1", "v2", "both")

# When the one-round formula ||T||^2 = s_dd - 2 b s_dw + b^2 s_ww keeps less than this fraction of
# s_dd it has lost too many digits to cancellation (D nearly parallel to W along a slice); such
# matrices take a second, exact round: form T locally and reduce sum(T^2) directly.
CANCELLATION_TOLERANCE = 1e-2


@dataclass
class SliceSums:
    """A request to complete per-slice sums along ``axis`` over every process sharing the slice.

    ``partial`` has shape ``(num_statistics, num_local_slices)`` in float32 and holds this
    process's partial sums; the driver replies with the complete sums, same shape.
    """

    partial: Tensor
    axis: int


@dataclass
class AnyTrue:
    """A request to turn a boolean tensor into a Python bool.

    The driver answers every such request of a round with one host synchronisation. The flags
    come from sums that were all-reduced, so every rank that shares the matrix answers alike.
    """

    flag: Tensor


MatrixStep = Generator["SliceSums | AnyTrue", "Tensor | bool", None]


def momentum_directions(
    grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool
) -> list[Tensor]:
    """Heavy-ball momentum M <- mu M + g, then the direction D (g + mu M with Nesterov, else M).

    With Nesterov, D is written into the gradient tensors (as torch.optim.Muon does): the
    gradient is not needed afterwards and this saves a full-size buffer per matrix.
    """
    if not bufs:
        return []
    for g, m in zip(grads, bufs):  # one fused pass per tensor (mul_ then add_ would be two)
        torch.add(g, m, alpha=momentum, out=m)
    if not nesterov:
        return list(bufs)
    torch._foreach_add_(grads, bufs, alpha=momentum)
    return list(grads)


def update_scale(lr: float, global_shape: Sequence[int], axis: int) -> float:
    """lr * 0.2 * sqrt(shape[k]): the unit-norm slices then have an RMS of 0.2, like AdamW's."""
    return lr * 0.2 * math.sqrt(global_shape[axis])


def _work_dtype(t: Tensor) -> Tensor:
    """Statistics and the update are computed in at least float32 (bf16 params included)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mano_matrix_step(
    weight: Tensor,
    direction: Tensor,
    layout,
    *,
    axis: int,
    variant: str,
    lr: float,
    weight_decay: float,
    eps: float,
) -> MatrixStep:
    """Update one matrix in place; yields the slice sums it needs (see module docstring).

    ``weight`` and ``direction`` are the local views the layout describes (2-D blocks or 1-D
    fragments). ``layout`` supplies ``dots(pairs, axis)`` / ``dot(x, y, axis)`` (partial
    per-slice sums of x*y),
    ``expand(v, axis)`` (a per-slice vector broadcast back to the local view),
    and ``global_shape``.
    """
    W = _work_dtype(weight)
    D = _work_dtype(direction)
    scale = update_scale(lr, layout.global_shape, axis)
    decay = 1.0 - lr * weight_decay
    if variant == "both":
        yield from _both_axes(W, D, layout, axis, scale, decay, eps)
    else:
        yield from _projected(W, D, layout, axis, variant, scale, decay, eps)
    if W is not weight:
        weight.copy_(W)


def _projection_coefficient(s_dw: Tensor, s_ww: Tensor, variant: str, eps: float) -> Tensor:
    """b such that the tangent direction is T = D - b W along each slice.

    v1 projects on the unit slice W_hat = W / clamp(|W|, eps): b = <D, W> / clamp(|W|, eps)^2.
    v2 drops the normalisation of W: b = <D, W>.
    """
    if variant == "v1":
        inv_norm = s_ww.sqrt().clamp_(min=eps).reciprocal_()
        return s_dw * inv_norm * inv_norm
    return s_dw


def _normaliser(s_tt: Tensor, variant: str, eps: float) -> Tensor:
    """|T| guarded by eps: clamped in v1 (the paper), added in v2 (the authors' later rule)."""
    norm = s_tt.clamp(min=0).sqrt_()
    return norm.clamp_(min=eps) if variant == "v1" else norm.add_(eps)


def _projected(W, D, layout, axis, variant, scale, decay, eps) -> MatrixStep:
    """v1/v2: the three slice sums s_dw, s_dd, s_ww in one round (one all-reduce when sharded).

    The update W(decay) - c T/|T| is applied as W * (decay + c b/|T|) - (c/|T|) D with
    per-slice coefficients, so T is never materialised on the common path: 3 reductions + 2
    elementwise passes over the matrix.
    """
    stats = layout.dots([(D, W), (D, D), (W, W)], axis)
    keep, step = yield from projected_coefficients(stats, W, lambda: D, layout, axis, variant, scale, decay, eps)
    W.mul_(layout.expand(keep, axis)).addcmul_(D, layout.expand(step, axis), value=-1.0)


def projected_coefficients(stats, W, direction, layout, axis, variant, scale, decay, eps):
    """From this process's partial sums ``stats`` = (s_dw, s_dd, s_ww): the per-slice ``keep``
    and ``step`` with W <- W * keep - step * D (a generator: yields the sums' completion).

    |T|^2 = s_dd - 2 b s_dw + b^2 s_ww. Where that cancels (see CANCELLATION_TOLERANCE) the
    matrix takes a second, exact round on T = D - b W (``direction()`` gives D).
    """
    s_dw, s_dd, s_ww = (yield SliceSums(stats, axis))
    b = _projection_coefficient(s_dw, s_ww, variant, eps)
    s_tt = s_dd - b * (2 * s_dw - b * s_ww)
    if (yield AnyTrue((s_tt <= CANCELLATION_TOLERANCE * s_dd).logical_and_(s_dd > 0).any())):
        T = torch.addcmul(direction(), layout.expand(b, axis), W, value=-1.0)
        (s_tt,) = yield SliceSums(layout.dot(T, T, axis).unsqueeze(0), axis)
    coef = _normaliser(s_tt, variant, eps).reciprocal_().mul_(scale)
    return coef * b + decay, coef


def _both_axes(W, D, layout, axis, scale, decay, eps) -> MatrixStep:
    """The "both" rule: project along 1-k then k, normalise along 1-k then k (clamped)."""
    other = 1 - axis
    (s,) = yield SliceSums(layout.dot(D, W, other).unsqueeze(0), other)
    U = torch.addcmul(D, layout.expand(s, other), W, value=-1.0)
    (s,) = yield SliceSums(layout.dot(U, W, axis).unsqueeze(0), axis)
    U.addcmul_(layout.expand(s, axis), W, value=-1.0)
    for ax in (other, axis):
        (s,) = yield SliceSums(layout.dot(U, U, ax).unsqueeze(0), ax)
        U.div_(layout.expand(s.sqrt().clamp_(min=eps), ax))
    W.mul_(decay).add_(U, alpha=-scale)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The fallback for embeddings, head and 1-D params, batched with foreach ops.

    Same rule (and operation order) as the official Mano code: eps is added to sqrt(v) before
    bias correction, and W <- W (1 - lr wd) - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (eps + sqrt v).
    """
    if not params:
        return
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    del denom
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    # Params that missed steps (no grad) have their own count; batch by count (usually one).
    by_step: dict[float, list[int]] = {}
    for i, s in enumerate(steps):
        by_step.setdefault(float(s), []).append(i)
    for t, idx in by_step.items():
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        torch._foreach_add_([params[i] for i in idx], [updates[i] for i in idx], alpha=-step_size)
