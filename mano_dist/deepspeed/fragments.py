"""The layout of a matrix of which this rank holds one contiguous run of row-major elements.

DeepSpeed ZeRO flattens parameters and cuts the flat buffer anywhere, so a rank holds elements
``[start, start + numel)`` of a (m, n) matrix as a 1-D view: rows may be split at either end.
Such a run is at most three rectangular blocks of the matrix: a partial head row, a block of
whole rows and a partial tail row. Each block is a 2-D *view* of the 1-D fragment and steps
like a dense matrix (its per-slice vectors broadcast as views); the blocks of one matrix run
the same step generator in unison and add their partial sums before the one all-reduce. So
nothing is kept per element (an index tensor per axis cost 16 B per element, 4x the momentum),
and the step allocates no temporaries the dense path does not.

The per-slice vectors always have the full slice length, so the reduction buffer is laid out
alike on every rank (zeros where this rank holds nothing) and one all-reduce over the
data-parallel group completes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..functional import MatrixStep, SliceSums, mano_matrix_step
from ..layouts import ReduceGroup, block_dots


@dataclass(frozen=True)
class MatrixBlock:
    """Rows ``[row, row + rows)`` x columns ``[col, col + cols)`` of a (m, n) matrix, stored
    row-major at ``offset`` in a fragment: a layout whose per-slice vectors have full length."""

    global_shape: tuple[int, int]
    offset: int
    row: int
    col: int
    rows: int
    cols: int
    groups: tuple[ReduceGroup, ...] = ()

    def view(self, fragment: Tensor) -> Tensor:
        """This block of a 1-D fragment tensor, as a 2-D view (no copy)."""
        return fragment[self.offset : self.offset + self.rows * self.cols].view(self.rows, self.cols)

    def _span(self, axis: int) -> slice:
        return slice(self.col, self.col + self.cols) if axis == 0 else slice(self.row, self.row + self.rows)

    def dots(self, pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
        """Partial per-slice sums of x*y for each pair: shape (len(pairs), full slice count)."""
        return self.full_length(block_dots(pairs, axis), axis)

    def full_length(self, sums: Tensor, axis: int) -> Tensor:
        """Per-slice sums over this block, (k, local slices), as (k, full slice count): zeros
        where the block has no elements, so every rank's reduction buffer is laid out alike."""
        if sums.shape[1] == self.global_shape[1 - axis]:
            return sums
        out = torch.zeros(len(sums), self.global_shape[1 - axis], dtype=sums.dtype, device=sums.device)
        out[:, self._span(axis)] = sums
        return out

    def dot(self, x: Tensor, y: Tensor, axis: int) -> Tensor:
        return self.dots([(x, y)], axis)[0]

    def expand(self, v: Tensor, axis: int) -> Tensor:
        """The block's part of a full-length per-slice vector, broadcastable against the block."""
        return v[self._span(axis)].unsqueeze(axis)

    def reduce_groups(self, axis: int) -> tuple[ReduceGroup, ...]:
        return self.groups

    def axis_is_local(self, axis: int) -> bool:
        return not self.groups


def fragment_blocks(global_shape: tuple[int, int], start: int, numel: int,
                    groups: tuple[ReduceGroup, ...] = ()) -> tuple[MatrixBlock, ...]:
    """Elements ``[start, start + numel)`` of a row-major (m, n) matrix as at most three blocks:
    a partial head row, the whole rows, a partial tail row (one empty block if numel is 0)."""
    n = global_shape[1]
    pos, end, out = start, start + numel, []

    def add(rows: int, cols: int) -> None:
        out.append(MatrixBlock(global_shape, pos - start, pos // n, pos % n, rows, cols, groups))

    if pos % n and pos < end:
        length = min(n - pos % n, end - pos)
        add(1, length)
        pos += length
    rows = (end - pos) // n
    if rows:
        add(rows, n)
        pos += rows * n
    if pos < end:
        add(1, end - pos)
        pos = end
    if not out:  # an empty block spanning whole rows (col 0), so its per-slice views fit it
        out.append(MatrixBlock(global_shape, 0, pos // n, 0, 0, n, groups))
    return tuple(out)


@dataclass(frozen=True)
class FlatFragmentLayout:
    """Elements ``[start, start + numel)`` of a row-major (m, n) matrix, held as a 1-D view.

    Holds only its (at most three) blocks: no per-element memory.
    """

    global_shape: tuple[int, int]
    start: int
    numel: int
    groups: tuple[ReduceGroup, ...] = ()
    blocks: tuple[MatrixBlock, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        m, n = self.global_shape
        if self.numel < 0 or self.start < 0 or self.start + self.numel > m * n:
            raise ValueError(
                f"fragment [{self.start}, {self.start + self.numel}) does not fit a {m}x{n} matrix"
            )
        object.__setattr__(self, "blocks", fragment_blocks(self.global_shape, self.start, self.numel, self.groups))

    def num_slices(self, axis: int) -> int:
        return self.global_shape[1 - axis]

    def dots(self, pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
        """Partial per-slice sums of x*y over the 1-D fragments ``pairs``: (len(pairs), slices)."""
        return sum(b.dots([(b.view(x), b.view(y)) for x, y in pairs], axis) for b in self.blocks)

    def reduce_groups(self, axis: int) -> tuple[ReduceGroup, ...]:
        return self.groups

    def axis_is_local(self, axis: int) -> bool:
        return not self.groups

    def matrix_step(self, weight: Tensor, direction: Tensor, **hyper) -> MatrixStep:
        """:func:`mano_matrix_step` on the 1-D fragment: each block steps as a dense matrix, all
        blocks in unison (one request per round for the whole fragment)."""
        steps = [mano_matrix_step(b.view(weight), b.view(direction), b, **hyper) for b in self.blocks]
        return steps[0] if len(steps) == 1 else in_unison(steps)


def split_fragment(global_shape: tuple[int, int], start: int, numel: int, splits: tuple[int, ...] | None,
                   groups: tuple[ReduceGroup, ...] = ()) -> list[tuple[int, int, FlatFragmentLayout]]:
    """Elements ``[start, start + numel)`` of a row-major (m, n) matrix as the parts of its row
    blocks (``splits`` rows each; None: one block of m rows): per block (offset of its part in
    the fragment, its length, its layout as a matrix of its own). A block this rank holds none
    of gets an empty part, so every rank's reduction buffer holds every block."""
    m, n = global_shape
    out, first = [], 0
    for count in splits or (m,):
        lo, hi = max(start, first * n), min(start + numel, (first + count) * n)
        if lo < hi:
            out.append((lo - start, hi - lo, FlatFragmentLayout((count, n), lo - first * n, hi - lo, groups)))
        else:
            out.append((0, 0, FlatFragmentLayout((count, n), 0, 0, groups)))
        first += count
    return out


def in_unison(steps: list[MatrixStep]) -> MatrixStep:
    """Several step generators of one matrix's blocks as one generator.

    The blocks yield the same sequence of requests, so each round their partial slice sums are
    added into one request and the complete sums are sent back to every block.
    """
    reply = None
    while True:
        requests = []
        for step in steps:
            try:
                requests.append(step.send(reply))
            except StopIteration:
                pass
        if not requests:
            return
        if len(requests) != len(steps):
            raise RuntimeError("the blocks of one matrix diverged in their step requests")
        reply = yield SliceSums(sum(r.partial for r in requests), requests[0].axis)
