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

# Per-slice statistics are accumulated in float64 from exact products of the float32 operands.
# Then the one-round |T|^2 = s_dd - 2 b s_dw + b^2 s_ww loses digits only when |T|^2 < ~1e-16
# s_dd, below where forming T in float32 loses them anyway (its rounding costs ~6e-8 |D| per
# element), so no second, exact round is needed (it cost a host read and a second all-reduce).
STATS_DTYPE = torch.float64


# Compiled CPU code (inductor's C++) sums a matrix's columns by walking each 8-column strip down
# every row: past a few dozen rows the hardware prefetcher loses track of the streams. Summing
# groups of this many rows first keeps them few (3 sums, AVX2 as ``fused.compile_options`` picks,
# ms per matrix for groups of 8/16/32 rows: 2048 x 5504 10.2/9.1/10.5, 5504 x 2048 15.4/10.9/18.9,
# 2048 x 2048 3.9/3.3/6.9, ZeRO-Offload's 4096 x 1024 blocks 4.1/4.5/6.3; ungrouped 11-33).
# GPUs need no such help.
COLUMN_GROUP_ROWS = 16


def product_sums(pairs: Sequence[tuple[Tensor, Tensor]], axis: int, group_rows: int = 0) -> Tensor:
    """(len(pairs), slices): :func:`product_sum_list` stacked."""
    return torch.stack(product_sum_list(pairs, axis, group_rows))


def product_sum_list(pairs: Sequence[tuple[Tensor, Tensor]], axis: int, group_rows: int = 0) -> list[Tensor]:
    """Per pair, the (slices,) sums along ``axis`` of the exact products x * y, in
    :data:`STATS_DTYPE`, for code that ``torch.compile`` fuses into one pass over the operands.
    Unstacked, so that a compiled step that uses them at once keeps them in registers: a
    stack is a buffer the sums must be written to first (on a GPU it would split a row step's
    one kernel into three).

    ``group_rows`` > 0 sums a column (axis 0) over groups of that many rows first (see
    :data:`COLUMN_GROUP_ROWS`); the remainder rows are added after."""
    wide = lambda t: t.to(STATS_DTYPE)  # noqa: E731 - widened after viewing (views of a copy do not trace)
    rows = pairs[0][0].shape[0]
    if axis == 1 or group_rows <= 0 or rows < 2 * group_rows:
        return [(wide(x) * wide(y)).sum(axis) for x, y in pairs]
    whole = rows - rows % group_rows

    def column_total(x: Tensor, y: Tensor) -> Tensor:
        xg, yg = (wide(t[:whole].view(-1, group_rows, t.shape[1])) for t in (x, y))
        total = (xg * yg).sum(1).sum(0)
        return total + (wide(x[whole:]) * wide(y[whole:])).sum(0) if whole < rows else total

    return [column_total(x, y) for x, y in pairs]


@dataclass
class SliceSums:
    """A request to complete per-slice sums along ``axis`` over every process sharing the slice.

    ``partial`` has shape ``(num_statistics, num_local_slices)`` in :data:`STATS_DTYPE` and holds
    this process's partial sums; the driver replies with the complete sums, same shape.
    """

    partial: Tensor
    axis: int


MatrixStep = Generator[SliceSums, Tensor, None]


def momentum_directions(
    grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool, skip: Tensor | None = None
) -> list[Tensor]:
    """Heavy-ball momentum M <- mu M + g, then the direction D (g + mu M with Nesterov, else M).

    With Nesterov, D is written into the gradient tensors (as torch.optim.Muon does): the
    gradient is not needed afterwards and this saves a full-size buffer per matrix.

    ``skip`` (a 0-d bool tensor on the device, see :func:`skip_gate`) leaves the momentum exactly
    as it was when true, without a host read: the gradients are zeroed and mu becomes 1.
    """
    if not bufs:
        return []
    mu = momentum
    if skip is not None:  # zeroed so that a non-finite gradient leaves the moments finite
        if torch.compiler.is_compiling():  # a select the kernel fuses: no write of the gradients
            grads = [torch.where(skip, 0.0, g) for g in grads]
        else:
            for g in grads:
                g.masked_fill_(skip, 0.0)
        mu = torch.full((), momentum, dtype=bufs[0].dtype, device=skip.device).masked_fill_(skip, 1.0)
    for g, m in zip(grads, bufs):  # one fused pass per tensor (mul_ then add_ would be two)
        if skip is None:
            torch.add(g, m, alpha=mu, out=m)
        else:
            torch.addcmul(g, m, mu, out=m)
    if not nesterov:
        return list(bufs)
    torch._foreach_add_(grads, bufs, alpha=momentum)
    return list(grads)


def skip_gate(lr: float, skip: Tensor | None) -> "float | Tensor":
    """The learning rate a step applies: ``lr``, or a float64 0-d tensor that is 0 where ``skip``.

    With lr = 0 the update is W * 1 - 0 * D and AdamW's moments keep their values (their mixing
    weights are gated alike), so a skipped step changes nothing, decided on the device.
    """
    if skip is None:
        return lr
    return torch.full((), lr, dtype=torch.float64, device=skip.device).masked_fill_(skip, 0.0)


def nonfinite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One bool per non-empty tensor, on their device: does it hold an inf or nan? (aminmax is
    ~20x faster than ``_foreach_norm(inf)`` on CPU, and exact: unlike a sum it cannot overflow.)"""
    extremes = [torch.stack(torch.aminmax(g)).float() for g in grads if g.numel()]
    if not extremes:
        return torch.zeros(0, dtype=torch.bool)
    return ~torch.isfinite(torch.stack(extremes)).all(dim=1)


def any_nonfinite(grads: Sequence[Tensor]) -> Tensor:
    """0-d float: 1 if any of the (non-empty) gradients holds an inf or nan, else 0. One read of
    each gradient and no host read; the same function runs eagerly and compiled."""
    return nonfinite_flags(grads).any().float()


def _add_scaled_(out: Tensor, x: Tensor, c: "float | Tensor") -> Tensor:
    """out += c * x, for a Python number or a 0-d tensor c."""
    return out.add_(x, alpha=c) if not torch.is_tensor(c) else out.addcmul_(x, c.to(out.dtype))


def update_scale(lr: "float | Tensor", global_shape: Sequence[int], axis: int) -> "float | Tensor":
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
    lr: "float | Tensor",
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
    keep, step = projected_coefficients((yield SliceSums(stats, axis)), variant, scale, decay, eps)
    W.mul_(layout.expand(keep.to(W.dtype), axis)).addcmul_(D, layout.expand(step.to(W.dtype), axis), value=-1.0)


def projected_coefficients(stats: Tensor, variant: str, scale, decay, eps: float) -> tuple[Tensor, Tensor]:
    """From the complete sums ``stats`` = (s_dw, s_dd, s_ww): the per-slice ``keep`` and
    ``step`` with W <- W * keep - step * D, i.e. W (decay) - scale T / |T| for T = D - b W.

    |T|^2 = s_dd - 2 b s_dw + b^2 s_ww, exact enough in float64 (see :data:`STATS_DTYPE`).
    """
    s_dw, s_dd, s_ww = stats
    b = _projection_coefficient(s_dw, s_ww, variant, eps)
    s_tt = s_dd - b * (2 * s_dw - b * s_ww)
    coef = _normaliser(s_tt, variant, eps).reciprocal_().mul_(scale)
    return coef * b + decay, coef


def _both_axes(W, D, layout, axis, scale, decay, eps) -> MatrixStep:
    """The "both" rule: project along 1-k then k, normalise along 1-k then k (clamped)."""
    other = 1 - axis
    (s,) = yield SliceSums(layout.dot(D, W, other).unsqueeze(0), other)
    U = torch.addcmul(D, layout.expand(s.to(W.dtype), other), W, value=-1.0)
    (s,) = yield SliceSums(layout.dot(U, W, axis).unsqueeze(0), axis)
    U.addcmul_(layout.expand(s.to(W.dtype), axis), W, value=-1.0)
    for ax in (other, axis):
        (s,) = yield SliceSums(layout.dot(U, U, ax).unsqueeze(0), ax)
        U.div_(layout.expand(s.sqrt().clamp_(min=eps).to(W.dtype), ax))
    _add_scaled_(W.mul_(decay), U, -scale)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: "float | Tensor",
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    skip: Tensor | None = None,
) -> None:
    """The fallback for embeddings, head and 1-D params, batched with foreach ops.

    Same rule (and operation order) as the official Mano code: eps is added to sqrt(v) before
    bias correction, and W <- W (1 - lr wd) - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (eps + sqrt v).

    The step counts stay tensors (each param has its own: one that missed steps has a lower
    count) and the bias corrections are computed from them on their device, so no count is read
    on the host. ``skip`` (0-d bool) gates everything: counts, moments and params keep their values.
    """
    if not params:
        return
    keep = 1.0 if skip is None else (~skip).to(exp_avgs[0].dtype)
    if skip is not None:  # zeroed so that a non-finite gradient leaves the moments finite
        if torch.compiler.is_compiling():  # a select the kernel fuses: no write of the gradients
            grads = [torch.where(skip, 0.0, g) for g in grads]
        else:
            for g in grads:
                g.masked_fill_(skip, 0.0)
        lr = skip_gate(lr, skip) if not torch.is_tensor(lr) else lr
    torch._foreach_add_(steps, keep if not torch.is_tensor(keep) else [keep] * len(steps))  # a list: no .item()
    # m <- m + (1 - b1) (g - m), v <- v + (1 - b2) (g^2 - v): lerp, with the weights gated by keep.
    delta = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(delta, keep * (1 - beta1))
    torch._foreach_add_(exp_avgs, delta)
    delta = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(delta, exp_avg_sqs)
    torch._foreach_mul_(delta, keep * (1 - beta2))
    torch._foreach_add_(exp_avg_sqs, delta)
    del delta
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    del denom
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_mul_(updates, _step_sizes(steps, lr, beta1, beta2))
    torch._foreach_sub_(params, updates)


def _step_sizes(steps: list[Tensor], lr: "float | Tensor", beta1: float, beta2: float) -> list[Tensor]:
    """lr sqrt(1 - b2^t) / (1 - b1^t) per param, as float64 0-d tensors on the counts' device
    (t >= 1: a first step that was skipped must not divide by 1 - b1^0 = 0)."""
    t = torch.stack(steps).to(torch.float64).clamp_(min=1.0)
    sizes = (1 - torch.pow(beta2, t)).sqrt_().div_(1 - torch.pow(beta1, t)).mul_(lr)
    return list(sizes.unbind())
