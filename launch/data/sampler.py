"""Which training window comes next: a seeded order over ``seq_len + 1``-token windows.

A batch is a slice ``[start, start + count)`` of an endless, epoch-by-epoch order of window
indices, so the data position is one integer (``sequences_seen``): the same for any world size
at a fixed global batch, and all a checkpoint needs to resume exactly.

Two orders:

- ``feistel`` (prepared folders): a keyed Feistel permutation over the window indices with
  cycle-walking, a fresh key per epoch. O(1) memory per rank whatever the corpus size. Six
  rounds whose round function is splitmix64's finaliser (full avalanche; statistically strong,
  not cryptographic, as Luby-Rackoff would need) give a well-mixed permutation: every window is
  visited once per epoch, and neighbouring positions in the order come from unrelated places in
  the corpus, across all shards and documents (a global shuffle, not a shuffle within shards).
- ``permutation`` (sources tokenized inside the job, which are small): numpy's seeded
  permutation, one int64 per window, kept because the bundled-text runs (and the convergence
  study's cached results) were made with it.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 6


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mix with full avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A bijection of ``range(n)`` keyed by ``key``: a balanced Feistel network on the smallest
    even number of bits covering ``n`` (a domain under 4n), cycle-walking until the image is
    below ``n`` (fewer than 4 walks expected). Holds a handful of integers, never a table."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.round_keys = [mix64(mix64(key & MASK64) ^ r) for r in range(ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} is outside range({self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle-walking: stays a bijection of range(n)
            x = self._encrypt(x)
        return x


class WindowSampler:
    """Non-overlapping windows of ``seq_len + 1`` tokens of ``tokens`` (anything with ``len``
    and slicing to an array), visited in a seeded order per epoch."""

    def __init__(self, tokens, seq_len: int, seed: int, order: str = "feistel"):
        if order not in ("feistel", "permutation"):
            raise ValueError(f"order must be feistel or permutation, got {order!r}")
        self.tokens, self.seq_len, self.seed, self.order = tokens, seq_len, seed, order
        self.windows = len(tokens) // (seq_len + 1)
        self._epoch_order: tuple[int, object] | None = None

    def _order(self, epoch: int):
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            if self.order == "feistel":
                perm = FeistelPermutation(self.windows, key=mix64(self.seed) ^ epoch)
            else:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._epoch_order = (epoch, perm)
        return self._epoch_order[1]

    def window_indices(self, start: int, count: int) -> list[int]:
        """Window numbers at positions ``start .. start+count`` of the endless order."""
        out = []
        for i in range(start, start + count):
            epoch, offset = divmod(i, self.windows)
            order = self._order(epoch)
            out.append(int(order(offset) if self.order == "feistel" else order[offset]))
        return out

    def batch(self, start: int, count: int):
        """Windows at positions ``start .. start+count``, as a (count, seq_len + 1) int64 tensor."""
        import torch  # here, not at import: preparation workers use this module without torch

        span = self.seq_len + 1
        rows = [np.asarray(self.tokens[w * span : (w + 1) * span], dtype=np.int64)
                for w in self.window_indices(start, count)]
        return torch.from_numpy(np.stack(rows))
