"""Mano's step as a few compiled kernels per group of like matrices: ``Mano(fused=True)``.

Eager PyTorch launches about 30 kernels per matrix per step; on a GPU that is launch-bound. Here
the matrices of a param group that share dtypes, device and sharding are stepped in batches
(``fused_driver``) by one ``torch.compile``'d function (inductor: C++ on CPU, Triton on CUDA, the
same code path) per *segment*, the lr and the skip flag as tensors so nothing recompiles as they change.

A variant's step is a list of per-slice reductions ("stages"), each along one axis:
- v1/v2: (s_dw, s_dd, s_ww) along k, then W <- W * keep - step * D;
- both:  <D,W> along 1-k, <U,W> along k, |U|^2 along 1-k, |U|^2 along k, then W <- W decay - c U.
A segment computes stages up to the first whose axis is sharded and returns that stage's partial
sums, all the batch's matrices' in one flat tensor; the driver completes them with lockstep's
buckets (one all-reduce per process group and round, the same collectives as the eager step)
and the next segment starts from the complete sums (their per-slice factors formed for all the
matrices at once), recomputing D (and U) from W, G, M in registers rather than writing and
re-reading them.
The last segment writes M and W. Unsharded matrices take one segment: one pass for row sums.
Each segment also returns the per-slice factors its passes broadcast (keep/step; "both"'s
coefficients and norms), so that the compiler computes each once per slice, not per element;
on CPU a column sum runs over groups of rows first (``functional.product_sums``).

The math is the eager path's (``functional.projected_coefficients``, the same operation order);
results agree to float rounding (the compiler may fuse multiply-adds). The non-finite check
costs no pass of its own: a step that may be skipped computes its first sums before anything is
written and before the decision, and a non-finite gradient makes them non-finite (float64 sums
of float32 products cannot overflow), so they are the check; the later segments are gated
(``skip``): M keeps its value, W is selected back, the gradient is not read as is.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .functional import COLUMN_GROUP_ROWS, adamw_step, product_sum_list, projected_coefficients
from .lockstep import holds_no_values


def _work(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _direction(g: Tensor, m: Tensor, momentum: float, nesterov: bool, skip: Tensor | None):
    """(D, M_new) without writing anything; a skipped step keeps M and has a finite D."""
    g, m = _work(g), _work(m)
    if skip is not None:
        g = torch.where(skip, 0.0, g)
        m_new = torch.where(skip, m, g + momentum * m)
    else:
        m_new = g + momentum * m
    return (g + momentum * m_new if nesterov else m_new), m_new


def _both_factor(i: int, sums: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The "both" rule's per-slice vector from its complete reduction ``i``, in W's dtype: a
    projection coefficient (i < 2), else a clamped norm (the eager step's operations)."""
    return sums[0].to(dtype) if i < 2 else sums[0].sqrt().clamp(min=eps).to(dtype)


def _both_u(w: Tensor, d: Tensor, factors: list[Tensor], axis: int) -> Tensor:
    """The "both" direction after the first ``len(factors)`` reductions."""
    other = 1 - axis
    u = d
    for i, (f, ax) in enumerate(zip(factors, (other, axis, other, axis))):
        u = u - f.unsqueeze(ax) * w if i < 2 else u / f.unsqueeze(ax)
    return u


def stage_axes(variant: str, axis: int) -> list[int]:
    """The axis of each reduction of a variant's step."""
    return [1 - axis, axis, 1 - axis, axis] if variant == "both" else [axis]


def stage_statistics(variant: str) -> int:
    """How many sums per slice each reduction of a variant's step yields."""
    return 1 if variant == "both" else 3


def _stage(spec: "SegmentSpec", i: int, w: Tensor, d: Tensor, factors: list[Tensor]) -> Tensor:
    """This process's partial sums of reduction ``i``, given the per-slice factors before it.
    Column sums on CPU go over groups of rows first; inductor's GPU reductions tile their own."""
    ax = stage_axes(spec.variant, spec.axis)[i]
    group_rows = COLUMN_GROUP_ROWS if spec.device_type == "cpu" else 0
    if spec.variant != "both":
        return product_sum_list([(d, w), (d, d), (w, w)], ax, group_rows)
    u = _both_u(w, d, factors, spec.axis)
    return product_sum_list([(u, w if i < 2 else u)], ax, group_rows)


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
    check: bool = False  # also return whether the sums are non-finite (see ``segments``)
    device_type: str = "cpu"  # what the segments are planned for: the matrices' device (a plan
    # for another is only for ``mano_dist.bench.kernels``, which schedules CUDA's kernels on CPU)


def run_segment(ws, gs, ms, knowns, lr: Tensor, skip: Tensor | None, spec: SegmentSpec) -> tuple[list, list, Tensor | None]:
    """Reductions ``[start, stop)`` of every matrix, then (``final``) the update of M and W in place.

    ``knowns``: per earlier reduction, the complete sums of all the matrices, flat and
    statistic-major (each statistic of every matrix in turn, then the next statistic), as this
    function returns them. Returns (sums, factors, verdict). Per reduction, ``sums`` holds the
    flat sums of all matrices (complete for a local axis; this process's partial ones for the
    last, sharded, one); none when final. ``verdict`` (with ``spec.check``): a 0-d float, 1 if
    any of these sums is non-finite, else 0. ``factors`` are the per-slice vectors the later
    passes broadcast (the update's keep and step, "both"'s coefficients and norms): returned so
    that inductor writes each one once; inlined, a column's factors (k = 0) would be
    recomputed, float64 square roots and all, at every element (measured: the k = 0 update 16
    -> 9 ms on CPU). Those of the earlier reductions are formed for all matrices at once (one
    kernel, not one per matrix). The caller drops them."""
    lr = lr.reshape(())
    stats, axes = stage_statistics(spec.variant), stage_axes(spec.variant, spec.axis)
    both = spec.variant == "both"
    dtype = _work(ws[0]).dtype if ws else torch.float32
    decay = 1.0 - lr * spec.weight_decay
    slices = [[w.shape[1 - ax] for w in ws] for ax in axes]  # per reduction, per matrix
    complete = [flat.view(stats, -1) for flat in knowns]
    if both:
        shared = [_both_factor(i, k, spec.eps, dtype) for i, k in enumerate(complete)]
    elif spec.final and complete:
        scales = _per_slice(spec.scales, slices[0], lr)
        shared = [f.to(dtype) for f in projected_coefficients(complete[0], spec.variant, lr * scales, decay, spec.eps)]
    else:
        shared = []
    sums: list[list[list[Tensor]]] = [[[] for _ in range(stats)] for _ in range(spec.start, spec.stop)]
    factors_out: list[Tensor] = list(shared)
    offsets = [0] * len(axes)
    for j, (w, g, m, scale) in enumerate(zip(ws, gs, ms, spec.scales)):
        W = _work(w)
        d, m_new = _direction(g, m, spec.momentum, spec.nesterov, skip)
        mine = [f.narrow(-1, offsets[i], slices[i][j]) for i, f in enumerate(shared)] if both else []
        own = [c.narrow(-1, offsets[i], slices[i][j]) for i, c in enumerate(complete)]
        for i in range(spec.start, spec.stop):
            own.append(_stage(spec, i, W, d, mine))
            if not spec.final:
                for stat, s in enumerate(own[-1]):
                    sums[i - spec.start][stat].append(s)
            if both and (spec.final or i < spec.stop - 1):  # not from this process's partial sums
                mine.append(_both_factor(i, own[-1], spec.eps, W.dtype))
                factors_out.append(mine[-1])
        if spec.final:
            if both:
                new = W * decay.to(W.dtype) - (lr * scale).to(W.dtype) * _both_u(W, d, mine, spec.axis)
            else:
                if spec.start == 0:  # the sums are this segment's: the factors are this matrix's
                    keep, step = projected_coefficients(own[0], spec.variant, lr * scale, decay, spec.eps)
                    keep, step = keep.to(W.dtype), step.to(W.dtype)
                    factors_out.extend((keep, step))
                else:
                    keep, step = (f.narrow(-1, offsets[0], slices[0][j]) for f in shared)
                new = W * keep.unsqueeze(spec.axis) - step.unsqueeze(spec.axis) * d
            m.copy_(m_new)
            # A skipped step's sums may be non-finite (they were formed before the decision).
            w.copy_(new if skip is None else torch.where(skip, W, new))
        offsets = [o + n[j] for o, n in zip(offsets, slices)]
    flats = [] if spec.final else [torch.cat([s for stat in stage for s in stat]) for stage in sums]
    # float64 sums of float32 products cannot overflow: their total is non-finite iff one is.
    verdict = (~torch.isfinite(sum(f.sum() for f in flats))).float() if spec.check and flats else None
    return flats, factors_out, verdict


def _per_slice(values: tuple[float, ...], counts: list[int], like: Tensor) -> "Tensor | float":
    """``values[j]`` repeated ``counts[j]`` times (a float if they are all one value), as
    selects on an index that the compiler fuses into the kernel reading them: no buffer of its
    own and no host-to-device copy (a ``cat`` of ``full``s is a kernel per piece)."""
    if len(set(values)) == 1:
        return values[0]
    index = torch.arange(sum(counts), device=like.device)
    out = torch.full((sum(counts),), values[-1], dtype=like.dtype, device=like.device)
    end = sum(counts)
    for value, count in zip(reversed(values[:-1]), reversed(counts[1:])):
        end -= count
        out = torch.where(index < end, value, out)
    return out


def segments(variant: str, axis: int, sharded: set[int], device_type: str, checks: bool = False
             ) -> list[tuple[int, int, bool]]:
    """(start, stop, final) per segment: cut after each reduction along a sharded axis.

    ``checks``: the step may be skipped for a non-finite gradient. The first reduction then
    ends a segment of its own, which writes nothing: its sums, non-finite exactly when a
    gradient the matrix reads is (or its W or M, which a finite gradient cannot make so), are
    the matrix's check (``fused_driver.first_statistics``). Except where the whole step is one
    kernel (:func:`one_kernel_step`): a cut would make it two passes over G, M and W (12 bytes
    per element read again), so those gradients are read by the flag's check (4 bytes).

    On CPU the reductions also end before the update, in a graph of their own, for two reasons
    in torch 2.13's inductor: its AVX-512 code widens float32 to float64 through memory (no
    vectorised conversion), so the statistics compile for AVX2 (:func:`compile_options`) while
    the update keeps AVX-512; and where its C++ backend fuses a reduction with the in-place
    writes of W and M into one outer loop (it does for "both"), it fails (``KeyError`` in
    ``is_all_write_read_contiguous``, which looks up the read of a buffer in the node that only
    waits for it, a "weak" user; pytorch/pytorch#188228, #196570).
    The update's graph reads the sums from the statistics' graph: a few bytes per slice, no
    collective."""
    axes = stage_axes(variant, axis)
    check_cut = checks and not one_kernel_step(variant, axis, sharded, device_type)
    out, start = [], 0
    for i, ax in enumerate(axes):
        if ax in sharded or (check_cut and i == 0) or (device_type == "cpu" and i == len(axes) - 1):
            out.append((start, i + 1, False))
            start = i + 1
    out.append((start, len(axes), True))
    return out


def one_kernel_step(variant: str, axis: int, sharded: set[int], device_type: str) -> bool:
    """Whether inductor makes the whole step of such a matrix one kernel: on a GPU (Triton) a
    v1/v2 step that sums rows it holds whole (axis 1, not sharded: FSDP2's every other step).
    Each program then sums its rows and updates them, reading them a second time while they
    are likely still in cache; a column sum (axis 0) is a kernel of its own, and so is every
    step on CPU (see :func:`segments`). ``tests/test_kernels.py`` checks the kernel counts
    with inductor's Triton scheduler, which runs without a GPU."""
    return device_type != "cpu" and variant != "both" and axis == 1 and axis not in sharded


def compile_options(device: torch.device, widens: bool) -> dict:
    """Inductor options for a graph on ``device``; ``widens``: it sums float32 products in float64.

    Torch 2.13's AVX-512 vector headers have no float32 -> float64 conversion: each one goes
    through a store, a scalar loop and a load, and the statistics pass ran 2.5-4x slower than
    the same code built for AVX2 (2048 x 5504, 3 sums: 8.9 -> 3.6 ms; a float32-only pass is
    memory-bound either way). GPUs compile Triton and take no options."""
    return {"cpp.simdlen": 256} if device.type == "cpu" and widens and _cpu_is_avx512() else {}


@functools.cache
def _cpu_is_avx512() -> bool:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return bool(isa) and isa.bit_width() == 512 and "avx512" in str(isa)


# ------------------------------------------------------------------------------ compilation
def _own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` as a function with its own code object. Dynamo keeps at most a few compiled
    graphs per code object (``recompile_limit``, 8) and fails hard past it with fullgraph; each
    (spec, shapes) here is one graph, so each gets its own code object and never recompiles."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class Compiler:
    """Compiled callables by key, and the fallback: if compiling fails once, warn once, report
    it (``failed``) and run every function uncompiled from then on: the same code, so the
    same collectives as the processes that compiled."""

    def __init__(self):
        self._compiled: dict[tuple, Callable] = {}
        self._closures: dict[tuple, Callable] = {}
        self.failed: str | None = None

    def closure(self, key: tuple, fn: Callable) -> Callable:
        """The first closure made for ``key``: a later one would be a new function to compile."""
        return self._closures.setdefault(key, fn)

    def __call__(self, key: tuple, fn: Callable, *args, options: dict | None = None):
        if self.failed is not None or any(holds_no_values(t) for t in _tensors(args)):
            return fn(*args)  # fake tensors (a memory dry run) run the same code eagerly
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = torch.compile(_own_code(fn, f"{len(self._compiled)}"), fullgraph=True, dynamic=False,
                                     options=options or None)
            self._compiled[key] = compiled
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: warn once, keep training
            # Compiling precedes running, so the failed call wrote nothing: it runs the same
            # code eagerly now (this step stays whole), and so does every later call.
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"mano_dist: Mano(fused=True) could not compile its step ({self.failed}); "
                          "running the same steps uncompiled from now on", stacklevel=3)
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
    return ("segment", spec, _signature(ws), _signature(gs), _signature(ms), _signature(knowns),
            lr.dtype, lr.device, skip is None)


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
