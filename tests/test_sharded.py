"""Mano on DTensors (FSDP2, HSDP, TP + FSDP2) equals one process on full tensors, and moves only
per-slice statistics: compared with tests/reference.py, collectives counted with
mano_dist.comm.CollectiveCounter around every optimizer.step()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist import run_distributed
from reference import ReferenceRun

VARIANTS = ("v1", "v2", "both")
STEPS = 6
HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1, eps=1e-8)


class Net(nn.Module):
    """Awkward row counts: 6, 3, 7 and 1 rows (6 and 7 uneven over 4 ranks, 3 and 1 smaller than
    the world size, so some ranks hold empty (0, n) shards), plus AdamW params (embedding, norm,
    bias, head). w1's 6 rows stay even over tp=2: TP activations must split evenly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.w1 = nn.Linear(6, 6, bias=False)
        self.w2 = nn.Linear(6, 3, bias=False)
        self.w3 = nn.Linear(3, 7, bias=True)
        self.norm = nn.LayerNorm(7)
        self.lm_head = nn.Linear(7, 11, bias=False)
        self.w4 = nn.Linear(7, 1, bias=False)

    def forward(self, x):
        h = self.w2(torch.relu(self.w1(self.emb(x))))
        h = self.norm(self.w3(h))
        return self.lm_head(h).logsumexp(-1) + self.w4(h).squeeze(-1)


MANO_NAMES = ["w1.weight", "w2.weight", "w3.weight", "w4.weight"]


def _shard(model, kind, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
    elif kind == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    elif kind == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh2d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh2d["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
        mesh = mesh2d["dp"]
    for name in ("w1", "w2", "w3", "w4", "lm_head"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _train_and_compare(rank, world_size, kind, variant, nonfinite="ignore"):
    """Six steps of the sharded model and of the reference; per-step collectives of step()."""
    from mano_dist import CollectiveCounter, Mano, mano_param_groups

    torch.manual_seed(0)
    model = Net().double()  # float64: v1 on a 1-row matrix amplifies rounding by 1/eps
    full_init = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = _shard(model, kind, world_size)
    groups = mano_param_groups(model)
    assert sorted(n for g in groups if g["algorithm"] == "mano" for n in g["param_names"]) == MANO_NAMES
    opt = Mano(groups, variant=variant, nonfinite=nonfinite, **HP)
    ref = ReferenceRun(full_init, MANO_NAMES, variant=variant, nesterov=True, **HP)
    comm = []
    for step in range(STEPS):
        x = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        with CollectiveCounter() as cc:
            opt.step()
        comm.append([(c.kind, c.payload_bytes, c.group_size) for c in cc.calls])
        opt.zero_grad()
        ref.step(grads)
    errors = {}
    for n, p in model.named_parameters():
        errors[n] = (_full(p.detach()).double() - ref.W[n]).abs().max().item()
        if n in MANO_NAMES:
            buf = _full(opt.state[p]["momentum_buffer"]).double()
            errors[n + ":momentum"] = (buf - ref.M[n]).abs().max().item()
    placements = {n: str(p.placements) for n, p in model.named_parameters() if n in MANO_NAMES}
    return {"errors": errors, "comm": comm, "placements": placements}


def _all_variants(rank, world_size, kind):
    return {v: _train_and_compare(rank, world_size, kind, v) for v in VARIANTS}


def _slices(full_shapes, axis):
    """Per matrix, the number of per-slice statistics for reducing over ``axis``."""
    return {n: s[1 - axis] for n, s in full_shapes.items()}


FULL_SHAPES = {"w1.weight": (6, 6), "w2.weight": (3, 6), "w3.weight": (7, 3), "w4.weight": (1, 7)}


def _check_results(results, kind, world_size):
    for rank, rank_result in enumerate(results):
        for variant, r in rank_result.items():
            for name, err in r["errors"].items():
                # float64 runs agree to ~1e-15, except v1 on the 1-row w4 (T = 0 up to rounding,
                # amplified by 1/eps, ~1e-9): 1e-7 is still 10x tighter than the issue's 1e-6.
                assert err < 1e-7, f"{kind} ws={world_size} {variant} {name}: |sharded - reference| = {err:.2e}"
            for step, calls in enumerate(r["comm"]):
                kinds = {c[0] for c in calls}
                assert kinds <= {"all_reduce"}, f"{variant} step {step}: {calls} (a full-matrix collective)"
                axis = step % 2
                if kind in ("fsdp", "hsdp"):
                    # Shard(0) only: axis 0 is sharded on one mesh dim, axis 1 is local.
                    slices = sum(_slices(FULL_SHAPES, 0).values())
                    sizes = [c[1] for c in calls]
                    if variant == "both":  # two stages reduce over rows on every step
                        assert sizes == [slices * 8, slices * 8], (variant, step, calls)
                    elif axis == 0:  # s_dw, s_dd, s_ww of every matrix in ONE all-reduce
                        # (float64 statistics: 8 bytes), also where the formula cancels (v1 on
                        # the 1-row w4, a dead-ReLU column of w2): no second round exists.
                        assert sizes == [3 * slices * 8], (variant, step, calls)
                    else:
                        assert calls == [], f"{variant} step {step}: axis 1 is local but got {calls}"
                    assert all(c[2] == world_size // (2 if kind == "hsdp" else 1) for c in calls)
                else:  # tp (dp 2 x tp 2): the bytes of every all-reduce, from the placements.
                    # Axis-0 sums (one per local column): over tp for w1 (rows on dp and tp), 6
                    # columns; over dp for all four matrices, 6 + 3 (w2's tp-local columns) + 3 + 7.
                    # Axis-1 sums (one per local row): over tp for w2 only (columns on tp), its
                    # rows on this dp rank (3 rows over dp 2: 2 on ranks 0-1, 1 on ranks 2-3).
                    one_stat = {0: [6 * 8, 19 * 8], 1: [(2 if rank < 2 else 1) * 8]}
                    sizes = [c[1] for c in calls]
                    if variant == "both":  # four one-statistic stages: along 1-axis, axis, 1-axis, axis
                        assert sizes == (one_stat[1 - axis] + one_stat[axis]) * 2, (variant, step, calls)
                    else:  # s_dw, s_dd, s_ww per group, one round
                        assert sizes == [3 * b for b in one_stat[axis]], (variant, step, calls)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_matches_single_process(tmp_path, world_size):
    results = run_distributed(_all_variants, world_size, tmp_path, "fsdp")
    assert "Shard(dim=0)" in results[0]["v2"]["placements"]["w1.weight"]
    _check_results(results, "fsdp", world_size)


@pytest.mark.distributed
def test_hsdp_matches_single_process(tmp_path):
    results = run_distributed(_all_variants, 4, tmp_path, "hsdp")
    assert "Replicate()" in results[0]["v2"]["placements"]["w1.weight"]
    _check_results(results, "hsdp", 4)


@pytest.mark.distributed
def test_tensor_parallel_plus_fsdp2_matches_single_process(tmp_path):
    results = run_distributed(_all_variants, 4, tmp_path, "tp")
    placements = results[0]["v2"]["placements"]
    assert "_StridedShard" in placements["w1.weight"] and "Shard(dim=1)" in placements["w2.weight"], placements
    _check_results(results, "tp", 4)
    # The column-parallel w1 has its rows sharded on both mesh dims: its axis-0 statistics are
    # reduced over dp and then tp, i.e. two all-reduces on even steps for v1/v2.
    for r in results:
        assert len(r["v2"]["comm"][0]) == 2 and len(r["v2"]["comm"][1]) == 1, r["v2"]["comm"][:2]


def _nonfinite_and_regression(rank, world_size):
    """NaN in one rank's shard: every rank skips (or raises) together; skip costs one 4-byte
    all-reduce, on the params' device, beside the step's usual statistics (the skip is decided
    on the device, so the step's collectives do not depend on values); the counter catches a
    full-matrix gather by DTensor's own ops."""
    from torch.distributed.tensor import DTensor

    from mano_dist import CollectiveCounter, Mano, mano_param_groups

    out = {}
    for policy in ("skip", "raise"):
        torch.manual_seed(0)
        model = _shard(Net(), "fsdp", world_size)
        opt = Mano(mano_param_groups(model), nonfinite=policy, **HP)
        x = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(0))
        model(x).pow(2).mean().backward()
        before = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        if rank == 1:
            model.w3.weight.grad.to_local()[0, 0] = float("nan")
        try:
            with CollectiveCounter() as cc:
                opt.step()
            out[policy] = {"skipped": opt.skipped_steps, "comm": [(c.kind, c.payload_bytes) for c in cc.calls],
                           "devices": cc.devices(), "step": opt.param_groups[0]["step"]}
        except FloatingPointError as e:
            out[policy] = {"raised": str(e)}
        out[policy]["unchanged"] = all(torch.equal(p.detach().to_local(), before[n]) for n, p in model.named_parameters())
        out[policy]["momentum_zero"] = all(
            not s["momentum_buffer"].to_local().any() for s in opt.state.values() if "momentum_buffer" in s)
    # Regression guard: an implementation that gathers the full matrices (as Muon must) is
    # caught by the same counter the tests above assert with.
    import mano_dist.layouts as layouts

    local = layouts.BlockLayout.local
    layouts.BlockLayout.local = lambda self, t: local(self, t.full_tensor() if isinstance(t, DTensor) else t)
    try:
        opt = Mano(mano_param_groups(model), nonfinite="ignore", **HP)
        model(x).pow(2).mean().backward()
        with CollectiveCounter() as cc:
            opt.step()
    finally:
        layouts.BlockLayout.local = local
    out["gathering_kinds"] = sorted({c.kind for c in cc.calls})
    # ... and so is a gather DTensor issues inside an op (Muon's Newton-Schulz matmuls).
    with CollectiveCounter() as cc:
        model.w3.weight @ model.w3.weight.T
    out["matmul_kinds"] = sorted({c.kind for c in cc.calls})
    return out


@pytest.mark.distributed
def test_nonfinite_decided_collectively_and_gather_regression_detected(tmp_path):
    results = run_distributed(_nonfinite_and_regression, 2, tmp_path)
    for rank, r in enumerate(results):
        # the rotation counts step() calls; weights and momentum are untouched
        assert r["skip"]["skipped"] == 1 and r["skip"]["step"] == 1 and r["skip"]["unchanged"]
        assert r["skip"]["momentum_zero"]
        flag, *stats = r["skip"]["comm"]
        assert flag == ("all_reduce", 4) and [k for k, _ in stats] == ["all_reduce"], r["skip"]["comm"]
        assert r["skip"]["devices"] == {"cpu"}
        assert r["raise"]["unchanged"] and "raised" in r["raise"]
        expected = "'w3.weight'" if rank == 1 else "another rank"
        assert expected in r["raise"]["raised"], r["raise"]["raised"]
        assert "all_gather" in r["gathering_kinds"], r["gathering_kinds"]
        assert "all_gather" in r["matmul_kinds"], r["matmul_kinds"]


def _rank_without_gradients(rank, world_size):
    """Rank 1 has no gradients on an axis-1 step (its statistics are local): it must still
    join the non-finite flag's all-reduce rank 0 enters (it used to return first: a hang)."""
    from mano_dist import CollectiveCounter, Mano, mano_param_groups

    torch.manual_seed(0)
    model = _shard(Net(), "fsdp", world_size)
    opt = Mano(mano_param_groups(model), **HP)
    x = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(0))
    calls = []
    for step in range(2):
        model(x).pow(2).mean().backward()
        if step == 1 and rank == 1:
            opt.zero_grad(set_to_none=True)
        with CollectiveCounter() as cc:
            opt.step()
        calls.append([(c.kind, c.payload_bytes, c.devices) for c in cc.calls])
        opt.zero_grad()
    return calls


@pytest.mark.distributed
def test_rank_without_gradients_issues_the_same_collectives(tmp_path):
    results = run_distributed(_rank_without_gradients, 2, tmp_path, timeout=300)
    assert results[0][1] == results[1][1] == [("all_reduce", 4, ("cpu",))], results


def test_collective_device_follows_the_backend():
    """CPU state over a CUDA-only backend (NCCL with ZeRO-Offload) reduces through the
    accelerator; a backend that takes CPU tensors (gloo, or gloo+nccl) takes them where they are."""
    from mano_dist.lockstep import collective_device

    class Group:
        def __init__(self, *types):
            self._device_types = [torch.device(t) for t in types]

    cpu = torch.device("cpu")
    assert collective_device(Group("cuda", "cpu"), cpu) == cpu
    assert collective_device(Group("cpu"), cpu) == cpu
    assert collective_device(Group("cuda"), cpu).type == "cuda"
    assert collective_device(Group("cuda"), torch.device("cuda", 0)) == torch.device("cuda", 0)
