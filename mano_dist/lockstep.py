"""Run the per-matrix step generators of ``functional.py`` in lockstep, batching communication.

Each round, every live generator yields one request. All slice-sum requests of the round are
packed into one flat float32 buffer per process group (ordered by the group's key, so every rank
issues the same collectives in the same order with the same sizes), all-reduced once, and
unpacked. Requests whose axis is local need nothing. Nothing here reads a value on the host,
and which collectives run depends only on the matrices' layouts, never on values, so every rank
issues the same ones.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import MatrixStep, SliceSums


def collective_device(group, device: torch.device) -> torch.device:
    """Where a collective over ``group`` can take a tensor that lives on ``device``.

    NCCL takes only CUDA tensors, so CPU-resident state (ZeRO-Offload partitions, FSDP2's CPU
    offload) reduces through the group's accelerator; gloo, and groups with both backends, take
    the tensor where it is.
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    types = [d.type for d in getattr(pg, "_device_types", ())]
    if not types or device.type in types:
        return device
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is not None and accelerator.type in types:
        return torch.device(accelerator.type, torch.accelerator.current_device_index())
    return torch.device(types[0])


def all_reduce_on_device(buffer: Tensor, group, op=dist.ReduceOp.SUM) -> None:
    """``dist.all_reduce`` of ``buffer`` in place, through :func:`collective_device` if needed."""
    device = collective_device(group, buffer.device)
    if device == buffer.device:
        dist.all_reduce(buffer, op=op, group=group)
        return
    staged = buffer.to(device, non_blocking=True)
    dist.all_reduce(staged, op=op, group=group)
    buffer.copy_(staged)


def default_all_reduce(buffer: Tensor, group) -> None:
    all_reduce_on_device(buffer, group)


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
        complete_sums([(lay, r) for _, lay, r in requests], all_reduce)
        live = [(gen, lay, r.partial) for gen, lay, r in requests]


def holds_no_values(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor (``FakeTensorMode``): shapes and dtypes, no data to read."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def complete_sums(requests: list, all_reduce) -> None:
    """Sum every request's partial statistics (``(layout, request)`` pairs; a request has
    ``partial`` and ``axis``) over its reduce groups, in place: one collective per group."""
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
