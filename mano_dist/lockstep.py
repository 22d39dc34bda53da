"""Run the per-matrix step generators of ``functional.py`` in lockstep, batching communication.

Each round, every live generator yields one request. All slice-sum requests of the round are
packed into one flat float32 buffer per process group (ordered by the group's key, so every rank
issues the same collectives in the same order with the same sizes), all-reduced once, and
unpacked. Requests whose axis is local need nothing. All boolean requests of a round are
answered with one host synchronisation; on fake tensors (a memory dry run, which has no values)
they are answered True without one, so the dry run takes the path that allocates the most.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import AnyTrue, MatrixStep, SliceSums


def default_all_reduce(buffer: Tensor, group) -> None:
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)


def run_lockstep(
    steps: Iterable[tuple[MatrixStep, object]],
    all_reduce: Callable[[Tensor, object], None] = default_all_reduce,
) -> None:
    """Drive ``(generator, layout)`` pairs to completion.

    A request for axis ``k`` is reduced over ``layout.reduce_groups(k)``; a matrix sharded on
    several mesh dims is summed over each of them in turn (sums are associative).
    """
    live = [(gen, layout, None) for gen, layout in steps]
    while live:
        requests = []
        for gen, layout, reply in live:
            try:
                requests.append((gen, layout, gen.send(reply)))
            except StopIteration:
                pass
        replies = _answer_flags([r for _, _, r in requests if isinstance(r, AnyTrue)])
        _complete_sums([(lay, r) for _, lay, r in requests if isinstance(r, SliceSums)], all_reduce)
        live = [
            (gen, lay, replies[id(r)] if isinstance(r, AnyTrue) else r.partial)
            for gen, lay, r in requests
        ]


def holds_no_values(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor (``FakeTensorMode``): shapes and dtypes, no data to read."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _answer_flags(flags: list[AnyTrue]) -> dict[int, bool]:
    if not flags:
        return {}
    if holds_no_values(flags[0].flag):
        return {id(f): True for f in flags}
    values = torch.stack([f.flag.reshape(()) for f in flags]).tolist()
    return {id(f): bool(v) for f, v in zip(flags, values)}


def _complete_sums(requests: list, all_reduce) -> None:
    """Sum every request's partial statistics over its reduce groups, in place."""
    buckets: dict[tuple, tuple[object, list[Tensor]]] = {}
    for layout, request in requests:
        for rg in layout.reduce_groups(request.axis):
            buckets.setdefault(rg.key, (rg.group, []))[1].append(request.partial)
    for key in sorted(buckets):
        group, tensors = buckets[key]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        all_reduce(flat, group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
