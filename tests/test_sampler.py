"""The window order: a bijection per epoch, the same batches at world sizes 1, 2 and 4 for one
global batch, an exact resume from one integer, and memory that does not grow with the corpus
(checked at 1e9 windows, none of them allocated)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from launch.data.sampler import FeistelPermutation, WindowSampler


class Length:
    """A token stream that is only a length: the order never reads tokens."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, key=12345)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_order_depends_on_seed_and_epoch_and_mixes_globally():
    n = 10_000
    s = WindowSampler(Length(n * 9), seq_len=8, seed=0)
    epoch0, epoch1 = s.window_indices(0, n), s.window_indices(n, n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    assert WindowSampler(Length(n * 9), seq_len=8, seed=1).window_indices(0, n) != epoch0
    # A global shuffle: the first 1000 positions fall evenly into the corpus's 10 tenths (as
    # 1000 uniform draws would: each tenth 100 +- 3 sigma), and neighbours are far apart.
    tenths = np.bincount(np.asarray(epoch0[:1000]) * 10 // n, minlength=10)
    assert np.all(np.abs(tenths - 100) < 30), tenths
    assert np.median(np.abs(np.diff(epoch0[:1000]))) > n / 10


def test_same_batches_at_world_sizes_1_2_4_and_exact_resume():
    tokens = np.arange(50 * 17, dtype=np.uint16)  # 50 windows of 16 + 1 tokens
    global_batch, steps = 8, 15  # crosses two epoch boundaries

    def run(world: int, sampler=None, start_step=0, seen=0):
        """What the trainer does: rank r takes its slice of each global batch."""
        sampler = sampler or WindowSampler(tokens, seq_len=16, seed=3)
        per_rank, batches = global_batch // world, []
        for _ in range(start_step, steps):
            batches.append(np.concatenate([sampler.batch(seen + r * per_rank, per_rank).numpy() for r in range(world)]))
            seen += global_batch
        return batches

    reference = run(1)
    for world in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(reference, run(world), strict=True))
    resumed = run(2, WindowSampler(tokens, seq_len=16, seed=3), start_step=9, seen=9 * global_batch)
    assert all(np.array_equal(a, b) for a, b in zip(reference[9:], resumed, strict=True))
    rows = np.concatenate(reference[:7])[:50]  # the first epoch: every window once
    assert sorted(rows[:, 0].tolist()) == list(range(0, 50 * 17, 17))


def test_memory_does_not_grow_with_the_number_of_windows():
    """Build the order and draw a batch past the first epoch at 1e3 and at 1e9 windows: the
    Python heap allocated is the same (a few integers), where a permutation would need 8 GB."""

    def peak(windows: int) -> int:
        tracemalloc.start()
        s = WindowSampler(Length(windows * 1025), seq_len=1024, seed=0)
        idx = s.window_indices(windows - 256, 512)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(set(idx[:256])) == 256 and all(0 <= i < windows for i in idx)
        return size

    small, huge = peak(1000), peak(10**9)
    assert huge < small + 4096, (small, huge)
