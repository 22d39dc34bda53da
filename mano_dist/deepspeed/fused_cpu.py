"""Mano's step on CPU-resident (ZeRO-Offload) fragments with fewer, fused passes.

Eager PyTorch makes about a dozen memory-bound passes over a partition per step; DeepSpeed's
``DeepSpeedCPUAdam`` makes one fused pass. Here three of Mano's phases are ``torch.compile``'d
(inductor emits vectorised C++ on CPU), each one read of its operands:

- ``momentum_direction_``: M <- mu M + g and, with Nesterov, g <- g + mu M (the direction D is
  written into the gradient, as in the eager path), per 1-D fragment;
- ``row_sums`` / ``column_sums``: the three slice sums <D,W>, |D|^2, |W|^2 of a 2-D block;
- ``apply_update``: W <- W * keep - step * D with per-slice ``keep`` and ``step``.

Between them the same coefficient math as the eager path (``functional.projected_coefficients``)
runs on the complete sums, so results equal the eager step up to float rounding (sums are
accumulated in another order). Shapes are compiled ``dynamic`` (fragments have many sizes). If
compiling fails, the same functions run eagerly, after one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..functional import (COLUMN_GROUP_ROWS, STATS_DTYPE, MatrixStep, SliceSums, product_sums, projected_coefficients,
                          update_scale)
from ..fused import compile_options
from .fragments import in_unison


def momentum_direction_(g: Tensor, m: Tensor, momentum: float, nesterov: bool, keep: Tensor) -> None:
    """M <- mu M + g; with Nesterov also g <- g + mu M (the direction D), in place. Where the
    0-d ``keep`` is false (a skipped step) M keeps its value and D = mu M (finite)."""
    m_new = torch.where(keep, g + momentum * m, m)
    m.copy_(m_new)
    if nesterov:
        g.copy_(torch.where(keep, g, 0.0) + momentum * m_new)


def row_sums(d: Tensor, w: Tensor) -> Tensor:
    """(3, rows): per-row <d,w>, <d,d>, <w,w> of 2-D blocks (k = 1), in float64."""
    return product_sums([(d, w), (d, d), (w, w)], 1)


def column_sums(d: Tensor, w: Tensor) -> Tensor:
    """(3, columns): per-column <d,w>, <d,d>, <w,w> of 2-D blocks (k = 0), in float64, over
    groups of rows first (see ``functional.COLUMN_GROUP_ROWS``)."""
    return product_sums([(d, w), (d, d), (w, w)], 0, COLUMN_GROUP_ROWS)


def apply_update(w: Tensor, d: Tensor, keep: Tensor, step: Tensor) -> None:
    """W <- W * keep - step * D, in place (``keep`` and ``step`` broadcast per slice)."""
    w.copy_(w * keep - step * d)


class _Compiled:
    """``fn`` compiled on first use; ``fn`` itself (eager) once compiling has failed."""

    def __init__(self, fn, widens: bool = False):
        self.fn, self.compiled, self.widens = fn, None, widens

    def __call__(self, *args):
        if self.compiled is not False:
            try:
                if self.compiled is None:
                    options = compile_options(torch.device("cpu"), self.widens)
                    self.compiled = torch.compile(self.fn, dynamic=True, options=options or None)
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: warn, keep training
                warnings.warn(f"mano_dist: torch.compile of {self.fn.__name__} failed "
                              f"({type(exc).__name__}: {exc}); using eager PyTorch", stacklevel=2)
                self.compiled = False
        return self.fn(*args)


MOMENTUM_DIRECTION = _Compiled(momentum_direction_)
# The sums widen float32 to float64: compiled for AVX2 on AVX-512 CPUs (see fused.compile_options).
ROW_SUMS = _Compiled(row_sums, widens=True)
COLUMN_SUMS = _Compiled(column_sums, widens=True)
APPLY_UPDATE = _Compiled(apply_update)


def momentum_directions(grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool,
                        skip: Tensor | None = None) -> list[Tensor]:
    """``functional.momentum_directions`` with one fused pass per run of adjacent 1-D views
    (the fragments of one flat partition are adjacent: usually one call per partition)."""
    if not grads:
        return []
    keep = torch.ones((), dtype=torch.bool, device=grads[0].device) if skip is None else ~skip.to(grads[0].device)
    for g, m in _adjacent_runs(list(zip(grads, bufs))):
        if g.numel():
            MOMENTUM_DIRECTION(g, m, momentum, nesterov, keep)
    return list(grads) if nesterov else list(bufs)


def _adjacent_runs(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Pairs of 1-D views merged where both views start where the previous pair's end."""
    runs: list[tuple[Tensor, Tensor]] = []
    for pair in pairs:
        if runs and all(_follows(prev, v) for prev, v in zip(runs[-1], pair)):
            runs[-1] = tuple(torch.as_strided(prev, (prev.numel() + v.numel(),), (1,), prev.storage_offset())
                             for prev, v in zip(runs[-1], pair))
        else:
            runs.append(pair)
    return runs


def _follows(prev: Tensor, v: Tensor) -> bool:
    return (prev.is_contiguous() and v.is_contiguous()
            and v.untyped_storage().data_ptr() == prev.untyped_storage().data_ptr()
            and v.storage_offset() == prev.storage_offset() + prev.numel())

def _block_sums(d: Tensor, w: Tensor, axis: int) -> Tensor:
    if not d.numel():
        return d.new_zeros(3, d.shape[1 - axis], dtype=STATS_DTYPE)
    return ROW_SUMS(d, w) if axis == 1 else COLUMN_SUMS(d, w)


def block_step(weight: Tensor, direction: Tensor, block, *, axis: int, variant: str, lr: float,
               weight_decay: float, eps: float) -> MatrixStep:
    """``functional.mano_matrix_step`` (v1/v2) of one fp32 2-D block, with the fused passes."""
    local = _block_sums(direction, weight, axis)
    scale = update_scale(lr, block.global_shape, axis)
    sums = yield SliceSums(block.full_length(local, axis), axis)
    keep, step = projected_coefficients(sums, variant, scale, 1.0 - lr * weight_decay, eps)
    if weight.numel():
        APPLY_UPDATE(weight, direction, block.expand(keep.to(weight.dtype), axis), block.expand(step.to(weight.dtype), axis))


def fragment_step(layout, weight: Tensor, direction: Tensor, **hyper) -> MatrixStep:
    """:func:`block_step` over the blocks of a ``FlatFragmentLayout`` (1-D fragment views), in
    unison like its eager ``matrix_step``."""
    steps = [block_step(b.view(weight), b.view(direction), b, **hyper) for b in layout.blocks]
    return steps[0] if len(steps) == 1 else in_unison(steps)


def supports(variant: str, dtype: torch.dtype) -> bool:
    """The fused path covers v1/v2 on fp32 state; "both" and other dtypes stay eager."""
    return variant in ("v1", "v2") and dtype == torch.float32
