"""Where a baseline needs whole matrices or global sums, the DTensor plumbing in one place.

- ``full(t)`` / ``local(t)``: the whole matrix (a gather, for DTensors) / this rank's shard.
- ``local_part(full, like)``: this rank's piece of a full tensor laid out like ``like``, cut
  locally (``src_data_rank=None``: no scatter).
- ``replication(t)``: on how many ranks each local element of ``t`` lives, so a world-wide SUM of
  ``local_sum / replication`` counts every element exactly once (HSDP replicate dims, and plain
  tensors held on every rank).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, distribute_tensor = None, None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def local_part(full_tensor: Tensor, like: Tensor) -> Tensor:
    if not is_dtensor(like):
        return full_tensor
    return distribute_tensor(full_tensor, like.device_mesh, like.placements, src_data_rank=None).to_local()


def replication(t: Tensor) -> int:
    if is_dtensor(t):
        mesh = t.device_mesh
        return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sums(values: Tensor, group=None) -> Tensor:
    """SUM over ranks (in place when a process group exists)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values


def weighted_dot(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """sum_p <x_p, y_p> / replication(p) over this rank's local shards, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in pairs:
        lx, ly = local(x), local(y)
        if lx.numel():
            total += torch.vdot(lx.reshape(-1).double(), ly.reshape(-1).double()).cpu() / replication(x)
    return total
