"""Where a matrix's elements live: the only thing that differs between dense and sharded Mano.

A layout answers four questions for the step algorithm in ``functional.py``:
- ``local(t)``: the local tensor the math works on (here a 2-D block, viewed as (rows, -1));
- ``dot(x, y, axis)`` / ``expand(v, axis)``: partial per-slice sums of x*y and their broadcast;
- ``reduce_groups(axis)``: the process groups over which those partial sums must be summed
  (empty when the axis is complete locally, so no communication at all);
- ``global_shape``: the matrix's true (m, n), which sets the update scale.

A param whose rows stack several logical matrices (a fused QKV or gate-up projection, declared
by a param group's ``"splits"``) is cut by :func:`split_rows` into one layout per row block, each
with its own global shape: the step then treats the blocks as the separate matrices they are.

All decisions about which mesh dims shard which axis are made here, from DTensor placements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .dtensors import is_dtensor
from .dtensors import local as local_tensor
from .functional import STATS_DTYPE

try:  # DTensor is public since torch 2.5; keep the dense path importable without it.
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    pass


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Tensors with more than 2 dims are treated as (shape[0], prod(rest))."""
    rest = 1
    for s in shape[1:]:
        rest *= s
    return (shape[0], rest)


@dataclass(frozen=True)
class ReduceGroup:
    """A process group that shards an axis, and the key its statistics are bucketed under."""

    key: tuple
    group: Any

    @classmethod
    def of(cls, group) -> "ReduceGroup":
        return cls(group_key(group), group)


def group_key(group) -> tuple:
    """(stride, size, ranks) of a process group.

    Buckets are all-reduced in key order. The same group must get the same key wherever it
    comes from (a 2-D mesh's dp dim and its 1-D ``mesh["dp"]`` submesh), and every rank must
    order the *roles* (dp before tp, ...) alike or ranks wait on each other in a cycle. On a
    device mesh, all groups of one role share the stride between consecutive ranks and the
    size, and those come first; the ranks only tell apart different groups of a rank.
    """
    import torch.distributed as dist

    ranks = tuple(sorted(dist.get_process_group_ranks(group)))
    stride = ranks[1] - ranks[0] if len(ranks) > 1 else 0
    return (stride, len(ranks), ranks)


@dataclass
class BlockLayout:
    """A matrix whose local part is a 2-D block: a plain tensor, or a DTensor's local shard."""

    global_shape: tuple[int, int]
    groups: dict[int, tuple[ReduceGroup, ...]] = field(default_factory=dict)
    # Which row block of its param this matrix is, ``(first row, rows)`` in the param; () for a
    # whole param. The same on every rank, so fused batches are formed alike everywhere.
    origin: tuple = ()

    def local(self, t: Tensor) -> Tensor:
        t = local_tensor(t)
        return t.view(matrix_shape(t.shape)) if t.ndim > 2 else t

    @staticmethod
    def dots(pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
        """Partial per-slice sums of x*y for each pair, stacked: shape (len(pairs), slices)."""
        return block_dots(pairs, axis)

    def dot(self, x: Tensor, y: Tensor, axis: int) -> Tensor:
        return self.dots([(x, y)], axis)[0]

    @staticmethod
    def expand(v: Tensor, axis: int) -> Tensor:
        return v.unsqueeze(axis)

    def reduce_groups(self, axis: int) -> tuple[ReduceGroup, ...]:
        return self.groups.get(axis, ())

    def axis_is_local(self, axis: int) -> bool:
        return not self.groups.get(axis)


# Rows per cache block: ~64K elements (256 KB in fp32) per operand.
_BLOCK_ELEMENTS = 1 << 16


def block_dots(pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
    """Per-slice dot products of 2-D tensors along ``axis``, all pairs in one sweep, in float64
    from exact products (``functional.STATS_DTYPE``: no cancellation round is needed).

    On CPU a matrix larger than the cache is memory-bound and ``vecdot(dim=0)`` reads it with a
    bad stride: sweeping row blocks that stay in cache, computing every pair's products on
    each block (and widening each block once), measured 34 -> 6 ms for the three sums of a
    (2730, 2048) shard. On accelerators the plain reductions are already bandwidth-optimal.
    """
    x0 = pairs[0][0]
    m, n = x0.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    if x0.device.type != "cpu" or m <= rows or is_fake(x0):  # a fake-tensor dry run models the GPU path
        wide = _widened(pairs, slice(None))
        return torch.stack([torch.linalg.vecdot(wide[id(x)], wide[id(y)], dim=axis) for x, y in pairs])
    if axis == 1:
        out = torch.empty(len(pairs), m, dtype=STATS_DTYPE, device=x0.device)
        for start in range(0, m, rows):
            rs = slice(start, start + rows)
            wide = _widened(pairs, rs)
            for i, (x, y) in enumerate(pairs):
                torch.linalg.vecdot(wide[id(x)], wide[id(y)], dim=1, out=out[i, rs])
        return out
    acc = torch.zeros(len(pairs), rows, n, dtype=STATS_DTYPE, device=x0.device)
    whole = m - m % rows
    for start in range(0, whole, rows):
        wide = _widened(pairs, slice(start, start + rows))
        for i, (x, y) in enumerate(pairs):
            acc[i].addcmul_(wide[id(x)], wide[id(y)])
    out = acc.sum(dim=1)
    if whole < m:
        wide = _widened(pairs, slice(whole, m))
        for i, (x, y) in enumerate(pairs):
            out[i] += torch.linalg.vecdot(wide[id(x)], wide[id(y)], dim=0)
    return out


def _widened(pairs: list[tuple[Tensor, Tensor]], rows: slice) -> dict[int, Tensor]:
    """Rows ``rows`` of every distinct operand, in float64 once each (products of float32
    values are exact there)."""
    out: dict[int, Tensor] = {}
    for pair in pairs:
        for t in pair:
            if id(t) not in out:
                out[id(t)] = t[rows].to(STATS_DTYPE)
    return out


def sharded_axes(placements, ndim: int) -> dict[int, list[int]]:
    """{matrix axis: [mesh dims sharding it]} from DTensor placements.

    ``Shard(d)`` and ``_StridedShard(d)`` (which in torch 2.13 is *not* a ``Shard`` subclass)
    both split tensor dim d; dims >= 1 all belong to matrix axis 1 of the (shape[0], -1) view.
    """
    axes: dict[int, list[int]] = {}
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, (Shard, _StridedShard)):
            dim = placement.dim if placement.dim >= 0 else placement.dim + ndim
            axes.setdefault(0 if dim == 0 else 1, []).append(mesh_dim)
        elif isinstance(placement, Partial):
            raise ValueError(
                "Mano got a DTensor with a Partial placement (pending reduction); reduce the "
                "gradients (e.g. FSDP2's reduce-scatter) before optimizer.step()."
            )
        elif not isinstance(placement, Replicate):
            raise ValueError(f"Mano does not know the DTensor placement {placement!r}")
    return axes


def layout_for(param: Tensor) -> BlockLayout:
    """The layout of a parameter: dense, or sharded as its DTensor placements say."""
    shape = matrix_shape(param.shape)
    if not is_dtensor(param):
        return BlockLayout(shape)
    mesh = param.device_mesh
    groups = {
        axis: tuple(ReduceGroup.of(mesh.get_group(mesh_dim)) for mesh_dim in mesh_dims if mesh.size(mesh_dim) > 1)
        for axis, mesh_dims in sharded_axes(param.placements, param.ndim).items()
    }
    return BlockLayout(shape, {a: g for a, g in groups.items() if g})


def check_splits(splits, rows: int | None, where: str) -> tuple[int, ...]:
    """``splits`` as a tuple of positive ints (summing to ``rows`` unless None), or a ValueError
    naming ``where``."""
    try:
        out = tuple(splits)
    except TypeError:
        out = ()
    if not out or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in out):
        raise ValueError(f"Invalid splits {splits!r} for {where}: a tuple of positive row counts")
    if rows is not None and sum(out) != rows:
        raise ValueError(f"Invalid splits {splits!r} for {where}: they sum to {sum(out)}, not its first dim {rows}")
    return out


def local_row_runs(param: Tensor) -> list[range]:
    """The global row indices (dim 0) of this rank's local rows of ``param``, in local order,
    as runs of consecutive rows.

    Computed from the placements on the host, with ``torch.chunk``'s rule (the one DTensor
    shards by): no tensor is made or read, so it costs nothing on a GPU or in a fake-tensor run.
    ``Shard(0)`` keeps rows contiguous; FSDP2 over tensor parallelism's ``_StridedShard(0)``
    takes a chunk of each of ``split_factor`` pieces.
    """
    runs = [range(param.shape[0])]
    if not is_dtensor(param):
        return runs
    mesh, ndim = param.device_mesh, param.ndim
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if not isinstance(placement, (Shard, _StridedShard)) or placement.dim % ndim != 0:
            continue
        factor = 1
        if isinstance(placement, _StridedShard):
            factor = placement._split_factor_int() if hasattr(placement, "_split_factor_int") else placement.split_factor
        runs = shard_rows(runs, mesh.size(mesh_dim), coordinate[mesh_dim], factor)
    return runs


def shard_rows(runs: list[range], size: int, mine: int, split_factor: int = 1) -> list[range]:
    """The part ``mine`` of ``size`` that ``Shard(0)`` (``split_factor`` 1) or
    ``_StridedShard(0, split_factor)`` (a chunk of each of ``split_factor`` pieces) gives one rank
    of the rows ``runs``."""
    return [r for piece in _chunks(runs, split_factor) for r in _chunks(piece, size)[mine]]


def _chunks(runs: list[range], count: int) -> list[list[range]]:
    """``torch.chunk`` of the sequence ``runs`` into ``count`` parts (ceil-sized; trailing parts
    may be empty), each part again a list of runs."""
    total = sum(len(r) for r in runs)
    size = -(-total // count) if total else 0
    return [_take(runs, min(i * size, total), min((i + 1) * size, total)) for i in range(count)]


def _take(runs: list[range], start: int, stop: int) -> list[range]:
    """Positions ``[start, stop)`` of the sequence ``runs``, as runs."""
    out, pos = [], 0
    for r in runs:
        lo, hi = max(start - pos, 0), min(stop - pos, len(r))
        if lo < hi:
            out.append(r[lo:hi])
        pos += len(r)
    return out


def split_rows(param: Tensor, layout: BlockLayout, splits: tuple[int, ...]) -> list[tuple[slice, BlockLayout]]:
    """The row blocks of ``param`` (``splits`` rows each, in order) as (the block's rows in the
    local tensor, the block's layout): global shape (rows of the block, n), the param's reduce
    groups. A rank holding none of a block gets an empty slice, so all ranks step (and reduce)
    the same blocks."""
    runs = local_row_runs(param)
    rows = [i for r in runs for i in (r.start, r.stop - 1)]
    if rows != sorted(rows):
        raise ValueError(f"splits need the local rows of {tuple(param.shape)} in ascending order; its "
                         f"placements {getattr(param, 'placements', None)} give {runs}")
    out, first = [], 0
    for count in splits:
        lo = _local_count_below(runs, first)
        hi = _local_count_below(runs, first + count)
        out.append((slice(lo, hi), BlockLayout((count, layout.global_shape[1]), layout.groups, (first, count))))
        first += count
    return out


def _local_count_below(runs: list[range], row: int) -> int:
    """How many local rows have a global index below ``row``."""
    return sum(min(max(row - r.start, 0), len(r)) for r in runs)
