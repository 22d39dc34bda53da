"""Mano's step as a few compiled kernels per group of like matrices: ``Mano(fused=True)``.

Eager PyTorch launches about 30 kernels per matrix per step; on a GPU that is launch-bound. Here
the matrices of a param group that share dtypes, device and sharding are stepped in batches
(``fused_driver``) by one ``torch.compile``'d function (inductor: C++ on CPU, Triton on CUDA, the
same code path) per *segment*, the lr and the skip flag as tensors so nothing recompiles as they change.

A variant's step is a list of per-slice reductions ("stages"), each along one axis:
- v1/v2: (s_dw, s_dd, s_ww) along k, then W <- W * keep - step * D;
- both:  <D,W> along 1-k, <U,W> along k, |U|^2 along 1-k, |U|^2 along k, then W <- W decay - c U.
A segment computes stages up to the first whose axis is sharded and returns that stage's partial
sums; the driver completes them with lockstep's buckets (one all-reduce per process group and
round, the same collectives as the eager step) and the next segment starts from the complete
sums, recomputing D (and U) from W, G, M in registers rather than writing and re-reading them.
The last segment writes M and W. Unsharded matrices take one segment: one pass for row sums.

The math is the eager path's (``functional.projected_coefficients``, the same operation order);
results agree to float rounding (the compiler may fuse multiply-adds). A skipped step (``skip``)
is gated inside the kernels: M keeps its value, the lr is 0, the gradient is not read as is.
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .functional import STATS_DTYPE, adamw_step, projected_coefficients
from .lockstep import holds_no_values


def _work(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sums(pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
    """(len(pairs), slices) float64 per-slice sums of exact products (see STATS_DTYPE)."""
    return torch.stack([(x.to(STATS_DTYPE) * y.to(STATS_DTYPE)).sum(axis) for x, y in pairs])


def _across(v: Tensor, axis: int, like: Tensor) -> Tensor:
    """A per-slice vector broadcast back over the matrix, in its dtype."""
    return v.to(like.dtype).unsqueeze(axis)


def _direction(g: Tensor, m: Tensor, momentum: float, nesterov: bool, skip: Tensor | None):
    """(D, M_new) without writing anything; a skipped step keeps M and has a finite D."""
    g, m = _work(g), _work(m)
    if skip is not None:
        g = torch.where(skip, 0.0, g)
        m_new = torch.where(skip, m, g + momentum * m)
    else:
        m_new = g + momentum * m
    return (g + momentum * m_new if nesterov else m_new), m_new


def _both_u(w: Tensor, d: Tensor, known: list[Tensor], axis: int, eps: float) -> Tensor:
    """The "both" direction after the first ``len(known)`` complete reductions."""
    other = 1 - axis
    u = d
    if len(known) > 0:
        u = u - _across(known[0][0], other, w) * w
    if len(known) > 1:
        u = u - _across(known[1][0], axis, w) * w
    if len(known) > 2:
        u = u / _across(known[2][0].sqrt().clamp(min=eps), other, w)
    if len(known) > 3:
        u = u / _across(known[3][0].sqrt().clamp(min=eps), axis, w)
    return u


def stage_axes(variant: str, axis: int) -> list[int]:
    """The axis of each reduction of a variant's step."""
    return [1 - axis, axis, 1 - axis, axis] if variant == "both" else [axis]


def stage_statistics(variant: str) -> int:
    """How many sums per slice each reduction of a variant's step yields."""
    return 1 if variant == "both" else 3


def _stage(variant: str, i: int, w: Tensor, d: Tensor, known: list[Tensor], axis: int, eps: float) -> Tensor:
    """This process's partial sums of reduction ``i``, given the complete ones before it."""
    if variant != "both":
        return _sums([(d, w), (d, d), (w, w)], axis)
    u = _both_u(w, d, known, axis, eps)
    return _sums([(u, w if i < 2 else u)], stage_axes(variant, axis)[i])


@dataclass(frozen=True)
class SegmentSpec:
    """Everything a compiled segment bakes in: recompiling is then never needed."""

    variant: str
    axis: int
    momentum: float
    nesterov: bool
    weight_decay: float
    eps: float
    scales: tuple[float, ...]  # per matrix, 0.2 sqrt(global shape[axis]); the lr multiplies them at run time
    start: int
    stop: int
    final: bool


def run_segment(ws, gs, ms, knowns, lr: Tensor, skip: Tensor | None, spec: SegmentSpec) -> list[Tensor]:
    """Reductions ``[start, stop)`` of every matrix: per reduction, the flat sums of all matrices
    (complete for a local axis; this process's partial ones for the last, sharded, one); or
    (final) the update of M and W in place, and no sums."""
    sums: list[list[Tensor]] = [[] for _ in range(spec.start, spec.stop)]
    lr = lr.reshape(())
    stats, axes = stage_statistics(spec.variant), stage_axes(spec.variant, spec.axis)
    for w, g, m, known, scale in zip(ws, gs, ms, knowns, spec.scales):
        W = _work(w)
        d, m_new = _direction(g, m, spec.momentum, spec.nesterov, skip)
        known = [k.view(stats, w.shape[1 - ax]) for k, ax in zip(known, axes)]  # the driver's sums are flat
        for i in range(spec.start, spec.stop):
            known.append(_stage(spec.variant, i, W, d, known, spec.axis, spec.eps))
            sums[i - spec.start].append(known[-1].reshape(-1))
        if not spec.final:
            continue
        decay = 1.0 - lr * spec.weight_decay
        if spec.variant == "both":
            new = W * decay.to(W.dtype) - (lr * scale).to(W.dtype) * _both_u(W, d, known, spec.axis, spec.eps)
        else:
            keep, step = projected_coefficients(known[0], spec.variant, lr * scale, decay, spec.eps)
            new = W * _across(keep, spec.axis, W) - _across(step, spec.axis, W) * d
        m.copy_(m_new)
        w.copy_(new)
    return [] if spec.final else [torch.cat(flat) for flat in sums]


def segments(variant: str, axis: int, sharded: set[int], device_type: str) -> list[tuple[int, int, bool]]:
    """(start, stop, final) per segment: cut after each reduction along a sharded axis.

    On CPU "both" also ends its reductions before the update: inductor 2.13's C++ outer-loop
    fusion fails on a graph that reduces along both axes and then writes W and M in place
    (``KeyError`` in ``is_all_write_read_contiguous``); an update-only final graph compiles."""
    axes = stage_axes(variant, axis)
    out, start = [], 0
    for i, ax in enumerate(axes):
        if ax in sharded or (variant == "both" and device_type == "cpu" and i == len(axes) - 1):
            out.append((start, i + 1, False))
            start = i + 1
    out.append((start, len(axes), True))
    return out


# ------------------------------------------------------------------------------ compilation
def _own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` as a function with its own code object. Dynamo keeps at most a few compiled
    graphs per code object (``recompile_limit``, 8) and fails hard past it with fullgraph; each
    (spec, shapes) here is one graph, so each gets its own code object and never recompiles."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class Compiler:
    """Compiled callables by key, and the fallback: if compiling fails once, warn once and
    report it, so the optimizer takes its eager path from then on."""

    def __init__(self):
        self._compiled: dict[tuple, Callable] = {}
        self._closures: dict[tuple, Callable] = {}
        self.failed: str | None = None

    def closure(self, key: tuple, fn: Callable) -> Callable:
        """The first closure made for ``key``: a later one would be a new function to compile."""
        return self._closures.setdefault(key, fn)

    def __call__(self, key: tuple, fn: Callable, *args):
        if self.failed is not None or any(holds_no_values(t) for t in _tensors(args)):
            return fn(*args)  # fake tensors (a memory dry run) run the same code eagerly
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = torch.compile(_own_code(fn, f"{len(self._compiled)}"), fullgraph=True, dynamic=False)
            self._compiled[key] = compiled
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: warn once, keep training
            # Compiling precedes running, so the failed call wrote nothing: it runs the same
            # code eagerly now (this step stays whole), and the optimizer's eager path next time.
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"mano_dist: Mano(fused=True) could not compile its step ({self.failed}); "
                          "using the eager step from now on", stacklevel=3)
            return fn(*args)

    def __len__(self) -> int:
        return len(self._compiled)


def _tensors(args):
    for a in args:
        if torch.is_tensor(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _signature(tensors: list[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def segment_key(spec: SegmentSpec, ws, gs, ms, knowns, lr, skip) -> tuple:
    return ("segment", spec, _signature(ws), _signature(gs), _signature(ms),
            tuple(_signature(k) for k in knowns), lr.dtype, lr.device, skip is None)


def flag_key(grads) -> tuple:
    return ("flag", _signature(grads))


def adamw_key(params, grads, skip, **hyper) -> tuple:
    return ("adamw", tuple(sorted(hyper.items())), _signature(params), _signature(grads), skip is None)


def fused_adamw(compiler: Compiler, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: Tensor,
                skip: Tensor | None, **hyper) -> None:
    """``functional.adamw_step`` compiled (its foreach ops become a few fused kernels)."""
    key = adamw_key(params, grads, skip, **hyper)

    def call(params, grads, exp_avgs, exp_avg_sqs, steps, lr, skip):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr.reshape(()), skip=skip, **hyper)

    compiler(key, compiler.closure(key, call), params, grads, exp_avgs, exp_avg_sqs, steps, lr, skip)


def lr_tensor(lr, device: torch.device) -> Tensor:
    """The lr as a float64 tensor of shape (1,) on ``device`` (a fill, no host-to-device copy).

    Not 0-d: dynamo lifts a 0-d CPU tensor to a Python float and guards on its value with
    ``.item()`` (a host read per call)."""
    return (lr if torch.is_tensor(lr) else torch.full((), float(lr), dtype=torch.float64, device=device)).reshape(1)


def scale_of(global_shape: tuple[int, int], axis: int) -> float:
    return 0.2 * math.sqrt(global_shape[axis])
