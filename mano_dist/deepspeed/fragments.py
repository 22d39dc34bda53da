"""The layout of a matrix of which this rank holds one contiguous run of row-major elements.

DeepSpeed ZeRO flattens parameters and cuts the flat buffer anywhere, so a rank holds elements
``[start, start + numel)`` of a (m, n) matrix as a 1-D view: rows may be split at either end.
The Mano step (``functional.py``) only needs per-column (axis 0) or per-row (axis 1) sums, so a
fragment contributes its partial sums at slice index ``i % n`` or ``i // n``; the vectors always
have the full slice length, so the reduction buffer is laid out alike on every rank (zeros where
this rank holds nothing) and one all-reduce over the data-parallel group completes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..layouts import ReduceGroup


@dataclass
class FlatFragmentLayout:
    """Elements ``[start, start + numel)`` of a row-major (m, n) matrix, held as a 1-D view."""

    global_shape: tuple[int, int]
    start: int
    numel: int
    groups: tuple[ReduceGroup, ...] = ()
    _index_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        m, n = self.global_shape
        if self.numel < 0 or self.start < 0 or self.start + self.numel > m * n:
            raise ValueError(
                f"fragment [{self.start}, {self.start + self.numel}) does not fit a {m}x{n} matrix"
            )

    def slice_index(self, axis: int, device: torch.device) -> Tensor:
        """For each element of the fragment, the slice it belongs to (column for 0, row for 1)."""
        key = (axis, device)
        if key not in self._index_cache:
            n = self.global_shape[1]
            i = torch.arange(self.start, self.start + self.numel, device=device)
            self._index_cache[key] = i % n if axis == 0 else torch.div(i, n, rounding_mode="floor")
        return self._index_cache[key]

    def num_slices(self, axis: int) -> int:
        return self.global_shape[1 - axis]

    def dots(self, pairs: list[tuple[Tensor, Tensor]], axis: int) -> Tensor:
        """Partial per-slice sums of x*y for each pair: shape (len(pairs), full slice count)."""
        x0 = pairs[0][0]
        out = torch.zeros(len(pairs), self.num_slices(axis), dtype=x0.dtype, device=x0.device)
        if self.numel:
            idx = self.slice_index(axis, x0.device)
            for row, (x, y) in zip(out, pairs):
                row.index_add_(0, idx, x * y)
        return out

    def dot(self, x: Tensor, y: Tensor, axis: int) -> Tensor:
        return self.dots([(x, y)], axis)[0]

    def expand(self, v: Tensor, axis: int) -> Tensor:
        """A per-slice vector gathered back to the fragment's elements."""
        return v[self.slice_index(axis, v.device)]

    def reduce_groups(self, axis: int) -> tuple[ReduceGroup, ...]:
        return self.groups

    def axis_is_local(self, axis: int) -> bool:
        return not self.groups
