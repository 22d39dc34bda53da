"""The DTensor plumbing in one place, for Mano (local shards) and the baselines (whole matrices,
global sums).

- ``full(t)`` / ``local(t)``: the whole matrix (a gather, for DTensors) / this rank's shard.
- ``local_part(full, like)``: this rank's piece of a full tensor laid out like ``like``, cut
  locally (``src_data_rank=None``: no scatter).
- ``replication(t)``: on how many ranks each local element of ``t`` lives, so a world-wide SUM of
  ``local_sum / replication`` counts every element exactly once (HSDP replicate dims, and plain
  tensors held on every rank).
- ``sum_device(tensors)`` / ``weighted_dot(pairs)``: global sums live on the params' device, so
  NCCL can all-reduce them (it rejects CPU tensors) and building them reads nothing back to the
  host; the caller reads the result once, where it needs a host number.
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


def sum_device(tensors, group=None) -> torch.device:
    """Where a global sum over ``tensors`` lives: the device of the first one's local shard.
    A rank without tensors takes the device its collectives need (CUDA under NCCL)."""
    for t in tensors:
        return local(t).device
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def weighted_dot(pairs: list[tuple[Tensor, Tensor]], device: torch.device | None = None) -> Tensor:
    """sum_p <x_p, y_p> / replication(p) over this rank's local shards, in float64, as a 0-d
    tensor on ``device`` (default: the first x's), without a host read."""
    device = sum_device([x for x, _ in pairs]) if device is None else device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in pairs:
        lx, ly = local(x), local(y)
        if lx.numel():
            total += torch.vdot(lx.reshape(-1).double(), ly.reshape(-1).double()).to(device) / replication(x)
    return total
