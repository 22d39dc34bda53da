"""Drives ``fused.py``'s compiled segments for a step's Mano groups, in rounds like lockstep.

Matrices of one param group are batched (up to :data:`BATCH_MATRICES` at a time) when they
agree on dtypes, device and which mesh groups shard each axis (so on the segments they take and
the collectives those need). Like shapes are batched together first, so the full batches of a
model's repeated layers reuse one compiled graph; the part batches left over (a shape with fewer
than a batch's worth of matrices) are then batched together, so a model of many one-off shapes
compiles a few graphs, not one per shape. Everything that decides a batch is the same on every
rank (global shapes, row-block origins, parameter order), never a local shard's shape.
Each round every batch runs its next segment; the partial sums of all batches are completed by
``lockstep.complete_sums`` (one all-reduce per process group), then the next round starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .functional import SliceSums
from .fused import (Compiler, SegmentSpec, compile_options, lr_tensor, run_segment, scale_of, segment_key, segments,
                    stage_axes)
from .lockstep import complete_sums

# Matrices per compiled call. Inductor emits a kernel per matrix either way; a fixed batch size
# makes every full batch of a shape reuse one compiled graph, so compiling costs the same for 12
# layers as for 2 (one graph of 48 matrices took minutes to build on CPU), while the calls per
# step stay a small fraction of the matrix count.
BATCH_MATRICES = 8


@dataclass
class Batch:
    """Matrices of one group stepped by the same compiled calls, and where their step has got to."""

    layout: object
    ws: list[Tensor]
    gs: list[Tensor]
    ms: list[Tensor]
    specs: list[SegmentSpec]
    lr: Tensor
    knowns: list[Tensor] = field(default_factory=list)  # per reduction done, all the matrices' sums
    position: int = 0


def batch_key(w: Tensor, g: Tensor, m: Tensor, layout) -> tuple:
    """What the matrices of one batch share (the same on every rank)."""
    groups = tuple(tuple(rg.key for rg in layout.reduce_groups(ax)) for ax in (0, 1))
    return (w.dtype, g.dtype, m.dtype, w.device, groups)


def like_key(layout) -> tuple:
    """Matrices that compile alike: the same global shape and row block."""
    return (tuple(layout.global_shape), getattr(layout, "origin", ()))


def _chunks(members: list) -> list[list]:
    """Full batches of like matrices, then the part batches left over, merged in order."""
    alike: dict[tuple, list] = {}
    for member in members:
        alike.setdefault(like_key(member[3]), []).append(member)
    full, rest = [], []
    for ms in alike.values():
        whole = len(ms) - len(ms) % BATCH_MATRICES
        full.extend(ms[i : i + BATCH_MATRICES] for i in range(0, whole, BATCH_MATRICES))
        rest.extend(ms[whole:])
    return full + [rest[i : i + BATCH_MATRICES] for i in range(0, len(rest), BATCH_MATRICES)]


def make_batches(group: dict, matrices: list, lr, axis: int, checks: bool = False,
                 device_type: str | None = None) -> list[Batch]:
    """``matrices``: (weight, grad, momentum, layout) local views of one param group; ``lr`` not
    gated by the skip (the final segments select W back); ``checks``: the step may be skipped
    (see :func:`first_statistics`); ``device_type``: plan the segments for it, not for the
    matrices' device (``mano_dist.bench.kernels``)."""
    by_key: dict[tuple, list] = {}
    for w, g, m, lay in matrices:
        by_key.setdefault(batch_key(w, g, m, lay), []).append((w, g, m, lay))
    batches, lrs = [], {}
    for members in (chunk for ms in by_key.values() for chunk in _chunks(ms)):
        lay, device = members[0][3], members[0][0].device
        planned = device_type or device.type
        if device not in lrs:  # one tensor per group and device, shared by its batches
            lrs[device] = lr_tensor(lr, device)
        sharded = {ax for ax in (0, 1) if lay.reduce_groups(ax)}
        scales = tuple(scale_of(x[3].global_shape, axis) for x in members)
        specs = [
            SegmentSpec(group["variant"], axis, float(group["momentum"]), bool(group["nesterov"]),
                        float(group["weight_decay"]), float(group["eps"]), scales, start, stop, final,
                        check=checks and start == 0 and not final, device_type=planned)
            for start, stop, final in segments(group["variant"], axis, sharded, planned, checks)
        ]
        batches.append(Batch(lay, [x[0] for x in members], [x[1] for x in members], [x[2] for x in members],
                             specs, lrs[device]))
    return batches


def first_statistics(batches: list[Batch], compiler: Compiler, all_reduce) -> list[Tensor]:
    """Runs the first segment of every batch that checks its statistics (``make_batches(...,
    checks=True)``: statistics only, nothing written), ungated, and returns their verdicts: per
    batch a 0-d float on the device, 1 if any of those sums is non-finite on this process, else
    0. Each matrix's first sums read all of its gradient, and one inf or nan in it makes them
    non-finite, so these are the batches' non-finite check, without a pass of its own. The
    caller combines and all-reduces them with the other checks, which read the gradients of
    the batches that do not check their own (:func:`unchecked_gradients`)."""
    return _run_round([b for b in batches if b.specs[0].check], None, compiler, all_reduce)


def unchecked_gradients(batches: list[Batch]) -> list[Tensor]:
    """The gradients of the batches whose step is one kernel (``fused.one_kernel_step``): no
    statistics precede their update, so the flag's check reads them."""
    return [g for b in batches if not b.specs[0].check for g in b.gs]


def run_batches(batches: list[Batch], skip: Tensor | None, compiler: Compiler, all_reduce) -> None:
    """Every batch from where it is to completion, all-reducing the partial sums of each round together."""
    live = [b for b in batches if b.position < len(b.specs)]
    while live:
        _run_round(live, skip, compiler, all_reduce)
        live = [b for b in live if b.position < len(b.specs)]


def _run_round(batches: list[Batch], skip: Tensor | None, compiler: Compiler, all_reduce) -> list[Tensor]:
    """Every batch's next segment, then one all-reduce per process group of the partial sums;
    returns the verdicts of the segments that check their sums (``SegmentSpec.check``)."""
    requests, verdicts = [], []
    for b in batches:
        spec = b.specs[b.position]
        args = (b.ws, b.gs, b.ms, b.knowns, b.lr, skip, spec)
        options = compile_options(b.ws[0].device, widens=spec.stop > spec.start)
        sums, _factors, verdict = compiler(segment_key(spec, *args[:-1]), run_segment, *args, options=options)
        b.position += 1
        if verdict is not None:
            verdicts.append(verdict)
        if not spec.final:
            requests.append((b, spec, sums[:-1], SliceSums(sums[-1], stage_axes(spec.variant, spec.axis)[spec.stop - 1])))
    complete_sums([(b.layout, r) for b, _, _, r in requests], all_reduce)
    for b, _, local, r in requests:
        b.knowns.extend([*local, r.partial])  # flat, as the next segment reads them
    return verdicts
