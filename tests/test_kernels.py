"""What a GPU would launch for Mano(fused=True), checked without one: each compiled segment is
scheduled by inductor's Triton scheduling for an H100's properties (``mano_dist.bench.kernels``),
and the kernels and the bytes they move are counted. These are the step's GPU-shaped claims: a row step is one kernel
per matrix that reads G, M and W once and writes M and W (20 bytes per element; AdamW moves
28), the other steps a few kernels per matrix, not tens."""

from __future__ import annotations

import pytest

SHAPE = (256, 192)  # big enough that the per-slice sums add little to the bytes per element
MATRICES = 3


def _per_element(plans, rows=SHAPE[0]):
    return sum(k.nbytes for p in plans for k in p.kernels) / (MATRICES * rows * SHAPE[1])


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("sharded", [(), (0,)], ids=["dense", "fsdp2"])
def test_a_row_step_is_one_kernel_per_matrix(variant, sharded):
    """Rows held whole (dense, or FSDP2's Shard(0) on a k = 1 step), the default non-finite
    skip: one segment whose one kernel per matrix sums each row and updates it, gated by the
    skip; the gradients' check is the flag's (4 bytes per element, read with AdamW's)."""
    from mano_dist.bench.kernels import check_kernels, step_plans

    rows = SHAPE[0] if not sharded else SHAPE[0] // 4
    plans = step_plans(variant, 1, SHAPE, sharded, rows, matrices=MATRICES)
    assert [(p.start, p.stop, p.final) for p in plans] == [(0, 1, True)]
    assert len(plans[0].kernels) == MATRICES, plans
    assert _per_element(plans, rows) == pytest.approx(20, abs=0.1)  # G, M, W in; M, W out
    check = check_kernels(SHAPE, MATRICES)
    assert sum(k.nbytes for k in check) / (MATRICES * SHAPE[0] * SHAPE[1]) == pytest.approx(4, abs=0.1)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("sharded", [(), (0,)], ids=["dense", "fsdp2"])
def test_a_column_step_is_its_statistics_then_its_update(variant, sharded):
    """A k = 0 step: its statistics (which are its non-finite check, and, sharded, what is
    all-reduced) then its update: 32 bytes per element. A column has few outputs for an H100's
    132 SMs, so inductor splits each sum in two: per matrix one kernel for the three partial
    sums and one to finish each, plus one verdict for the batch; then one kernel for every
    matrix's per-column factors and one update per matrix."""
    from mano_dist.bench.kernels import step_plans

    plans = step_plans(variant, 0, SHAPE, sharded, matrices=MATRICES)
    assert [(p.start, p.stop, p.final) for p in plans] == [(0, 1, False), (1, 1, True)]
    assert [len(p.kernels) for p in plans] == [4 * MATRICES + 1, MATRICES + 1], plans
    assert 32 <= _per_element(plans) <= 33  # and the per-column sums, written and read back


@pytest.mark.parametrize("axis", [0, 1])
def test_both_stays_a_few_kernels_per_matrix(axis):
    """"both" reduces along both axes (four sums, some of them all-reduced under FSDP2): at
    most 10 kernels and 70 bytes per element per matrix (3 matrices: 6.7-9.7 and 52-66 now)."""
    from mano_dist.bench.kernels import step_plans

    for sharded in ((), (0,)):
        plans = step_plans("both", axis, SHAPE, sharded, matrices=MATRICES)
        assert sum(len(p.kernels) for p in plans) <= 10 * MATRICES, (sharded, [len(p.kernels) for p in plans])
        assert _per_element(plans) <= 70, (sharded, _per_element(plans))


def test_the_adamw_fallback_is_one_kernel_per_batch():
    """The compiled AdamW fallback: its foreach ops are one kernel for the batch (and one for
    the step counts), however many tensors, and it does not write the gradients (a skip is a
    select in the kernel): 28 bytes per element for p, g, m, v, plus an intermediate buffer
    inductor counts (40 when it wrote the gradients)."""
    from mano_dist.bench.kernels import adamw_kernels

    kernels = adamw_kernels(SHAPE, MATRICES)
    assert len(kernels) <= 2
    assert sum(k.nbytes for k in kernels) / (MATRICES * SHAPE[0] * SHAPE[1]) == pytest.approx(32, abs=0.1)
