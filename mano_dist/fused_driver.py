"""Drives ``fused.py``'s compiled segments for a step's Mano groups, in rounds like lockstep.

Matrices of one param group are batched (up to :data:`BATCH_MATRICES` at a time) when they
agree on everything a compiled segment bakes in (local shape and strides, dtypes, device,
global shape, which mesh groups shard each axis).
Each round every batch runs its next segment; the partial sums of all batches are completed by
``lockstep.complete_sums`` (one all-reduce per process group), then the next round starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .functional import SliceSums
from .fused import Compiler, SegmentSpec, lr_tensor, run_segment, scale_of, segment_key, segments, stage_axes
from .lockstep import complete_sums

# Matrices per compiled call. Inductor emits a kernel per matrix either way; a fixed batch size
# makes every full batch of a shape reuse one compiled graph, so compiling costs the same for 12
# layers as for 2 (one graph of 48 matrices took minutes to build on CPU), while the calls per
# step stay a small fraction of the matrix count.
BATCH_MATRICES = 8


@dataclass
class Batch:
    """Like matrices of one group, and where their step has got to."""

    layout: object
    ws: list[Tensor]
    gs: list[Tensor]
    ms: list[Tensor]
    specs: list[SegmentSpec]
    lr: Tensor
    knowns: list[list[Tensor]] = field(default_factory=list)
    position: int = 0


def batch_key(w: Tensor, g: Tensor, m: Tensor, layout) -> tuple:
    groups = tuple(tuple(rg.key for rg in layout.reduce_groups(ax)) for ax in (0, 1))
    return (tuple(w.shape), w.stride(), w.dtype, g.dtype, g.stride(), m.dtype, m.stride(), w.device,
            tuple(layout.global_shape), groups, getattr(layout, "origin", ()))


def make_batches(group: dict, matrices: list, lr, axis: int) -> list[Batch]:
    """``matrices``: (weight, grad, momentum, layout) local views of one param group."""
    by_key: dict[tuple, list] = {}
    for w, g, m, lay in matrices:
        by_key.setdefault(batch_key(w, g, m, lay), []).append((w, g, m, lay))
    batches = []
    chunks = [ms[i : i + BATCH_MATRICES] for ms in by_key.values() for i in range(0, len(ms), BATCH_MATRICES)]
    for members in chunks:
        lay = members[0][3]
        sharded = {ax for ax in (0, 1) if lay.reduce_groups(ax)}
        specs = [
            SegmentSpec(group["variant"], axis, float(group["momentum"]), bool(group["nesterov"]),
                        float(group["weight_decay"]), float(group["eps"]), scale_of(lay.global_shape, axis),
                        start, stop, final)
            for start, stop, final in segments(group["variant"], axis, sharded, members[0][0].device.type)
        ]
        batches.append(Batch(lay, [x[0] for x in members], [x[1] for x in members], [x[2] for x in members],
                             specs, lr_tensor(lr, members[0][0].device), [[] for _ in members]))
    return batches


def run_batches(batches: list[Batch], skip: Tensor | None, compiler: Compiler, all_reduce) -> None:
    """Every batch to completion, all-reducing the partial sums of each round together."""
    live = list(batches)
    while live:
        requests = []
        for b in live:
            spec = b.specs[b.position]
            args = (b.ws, b.gs, b.ms, b.knowns, b.lr, skip, spec)
            sums = compiler(segment_key(spec, *args[:-1]), run_segment, *args)
            if not spec.final:
                requests.append((b, sums[:-1], SliceSums(sums[-1], stage_axes(spec.variant, spec.axis)[spec.stop - 1])))
        complete_sums([(b.layout, r) for b, _, r in requests], all_reduce)
        for b, local, r in requests:
            spec = b.specs[b.position]
            axes = stage_axes(spec.variant, spec.axis)[spec.start : spec.stop]
            for flat, ax in zip([*local, r.partial], axes):
                stats = 1 if spec.variant == "both" else 3
                for known, s in zip(b.knowns, flat.view(len(b.ws), stats, b.ws[0].shape[1 - ax]).unbind(0)):
                    known.append(s)
            b.position += 1
        live = [b for b, _, _ in requests]
