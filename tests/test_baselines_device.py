"""The baselines on a GPU's terms, checked on CPU: Momo's and MuonMax's global sums live on the
params' device (NCCL all-reduces only accelerator tensors) and their steps read (almost) nothing
back to the host (each read is a sync on CUDA).

A CPU machine cannot tell "the params' device" from a hard-coded "cpu", so the device choice is
also checked on meta tensors, and MuonMax runs a whole step on them; the 2-rank collective check
runs on gloo here and on NCCL where two GPUs exist."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist import run_distributed
from test_sharded import Net

BASELINES = "mano_dist/baselines/"


def _matrices(device="cpu"):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(shape, device=device)) for shape in ((6, 4), (3, 6), (5, 5))]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def _count_step(opt, params, steps=2, loss=None):
    """The DispatchCounter of the last of ``steps`` steps (the first creates nothing: state is eager)."""
    from mano_dist.dispatch import DispatchCounter

    for step in range(steps):
        _set_grads(params, step)
        with DispatchCounter() as dc:
            opt.step() if loss is None else opt.step(loss=loss)
    return dc


def test_sum_device_is_the_params_device_not_cpu():
    from mano_dist.dtensors import sum_device, weighted_dot

    x, y = torch.randn(3, 2, device="meta"), torch.randn(3, 2, device="meta")
    assert sum_device([x, torch.randn(2)]) == torch.device("meta")  # the first tensor decides
    assert weighted_dot([(x, y)]).device.type == "meta"
    assert weighted_dot([(x, y)], torch.device("meta")).dtype == torch.float64
    assert sum_device([]) == torch.device("cpu")  # no tensors and no NCCL group: CPU
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(weighted_dot([(a, b), (b, b)]), (a * b).sum() + (b * b).sum(), rtol=1e-14, atol=0)


def test_muonmax_step_runs_on_the_params_device():
    """A host read of N (``float(vdot)``) fails on meta tensors: the whole step stays there."""
    from mano_dist.baselines import MuonMax

    params = _matrices("meta")
    bias = nn.Parameter(torch.zeros(5, device="meta"))
    opt = MuonMax([{"params": params}, {"params": [bias], "algorithm": "adamw"}], lr=0.01)
    _set_grads(params + [bias], 0)
    opt.step()
    assert opt._last_nuclear.device.type == "meta"
    assert all(p.device.type == "meta" for p in params + [bias])


def test_muonmax_step_reads_nothing_on_the_host():
    from mano_dist.baselines import MuonMax

    params = _matrices()
    dc = _count_step(MuonMax(params, lr=0.01), params)
    assert dc.host_reads == 0, dc.host_read_sites
    assert dc.ops > 0


def test_momo_step_reads_the_host_once():
    from mano_dist.baselines import MomoMuonMax

    params = _matrices()
    dc = _count_step(MomoMuonMax(params, lr=0.01), params, loss=torch.tensor(2.0))
    assert dc.host_reads <= 1, dc.host_read_sites


@pytest.mark.parametrize("name", ["muonmax", "momo-mano", "momo-muonmax"])
def test_baseline_code_reads_the_host_at_most_once_on_a_full_model(name):
    """With embeddings, norms and biases (AdamW's part) and Mano's own step around: the reads
    made by the baselines' code itself. (Mano's and the AdamW fallback's are theirs to count.)"""
    from mano_dist.baselines import build_optimizer, needs_loss

    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(name, model, lr=0.01)
    params = [p for p in model.parameters()]
    dc = _count_step(opt, params, loss=torch.tensor(2.0) if needs_loss(opt) else None)
    ours = [s for s in dc.host_read_sites if BASELINES in s]
    assert len(ours) <= (1 if name.startswith("momo") else 0), ours


def _fsdp(model, device_type, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for name in ("w1", "w2", "w3", "w4", "lm_head"):
        fully_shard(getattr(model, name), mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _collective_devices(rank, world_size, device_type):
    """Per baseline: the device types of every collective's tensors in two steps, and the params'."""
    from mano_dist import CollectiveCounter
    from mano_dist.baselines import build_optimizer, needs_loss

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    out = {}
    for name in ("muonmax", "momo-mano", "momo-muonmax"):
        torch.manual_seed(0)
        model = _fsdp(Net().to(device), device_type, world_size)
        opt = build_optimizer(name, model, lr=0.01)
        devices, calls = set(), 0
        for step in range(2):
            x = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(step)).to(device)
            loss = model(x).pow(2).mean() * 0.1 + 1.0
            loss.backward()
            with CollectiveCounter() as cc:
                opt.step(loss=loss.detach()) if needs_loss(opt) else opt.step()
            opt.zero_grad()
            devices |= cc.devices()
            calls += cc.count()
        out[name] = {"devices": devices, "calls": calls,
                     "params": {p.to_local().device.type for p in model.parameters()}}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("backend,device_type", [
    ("gloo", "cpu"),
    pytest.param("nccl", "cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")),
])
def test_collectives_run_on_the_params_device(tmp_path, backend, device_type):
    results = run_distributed(_collective_devices, 2, tmp_path, device_type, backend=backend)
    for rank_result in results:
        for name, r in rank_result.items():
            assert r["calls"] > 0, name
            assert r["params"] == {device_type}, (name, r)
            assert r["devices"] == r["params"], (name, r)
