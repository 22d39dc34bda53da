"""Sharded checkpoints: DCP round trips across world sizes and shardings, exact resume after a
kill, crash safety of a save killed midway, the hidden get_state_dict step, and the clear errors
(raised on every rank) for missing, incomplete, mismatched and corrupted checkpoints.

The "uninterrupted run" the resumed runs are compared with is one process on the full model
(itself tested against tests/reference.py in test_optimizer.py / test_sharded.py)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist import run_distributed

HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1, eps=1e-8)
GLOBAL_BATCH = 12  # divisible by every data-parallel size used below (1, 2, 3, 4)
SAVE_AT = 3  # odd: the resumed step uses the column axis (rotation phase 1)
TOTAL = 6


class Net(nn.Module):
    """Rows 6, 3, 7, 1 (uneven and empty shards over 3 and 4 ranks) plus AdamW params; w1/w2 can
    be tensor-parallel (6 rows split evenly over tp=2)."""

    def __init__(self, hidden: int = 3, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.w1 = nn.Linear(6, 6, bias=False)
        self.w2 = nn.Linear(6, hidden, bias=False)
        self.w3 = nn.Linear(hidden, 7, bias=True)
        self.norm = nn.LayerNorm(7)
        self.lm_head = nn.Linear(7, 11, bias=False)
        self.w4 = nn.Linear(7, 1, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.w2(self.drop(torch.relu(self.w1(self.emb(x)))))
        h = self.norm(self.w3(h))
        return self.lm_head(h).logsumexp(-1) + self.w4(h).squeeze(-1)


def _shard(model, kind, world_size):
    """Shard ``model``; return (model, data-parallel rank, data-parallel size)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if kind == "plain":
        return model, 0, 1
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
        dp_rank, dp_size = dist.get_rank(), world_size
    elif kind == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
        dp_rank, dp_size = dist.get_rank(), world_size
    elif kind == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh2d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh2d["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
        mesh = mesh2d["dp"]
        dp_rank, dp_size = mesh.get_local_rank(), 2
    for name in ("w1", "w2", "w3", "w4", "lm_head"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, dp_rank, dp_size


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(step, dp_rank, dp_size):
    x = torch.randint(0, 11, (GLOBAL_BATCH, 4), generator=torch.Generator().manual_seed(1000 + step))
    per = GLOBAL_BATCH // dp_size
    return x[dp_rank * per : (dp_rank + 1) * per]


def _build(kind, world_size, seed=0):
    from mano_dist import Mano, mano_param_groups

    torch.manual_seed(seed)
    model, dp_rank, dp_size = _shard(Net().double(), kind, world_size)
    opt = Mano(mano_param_groups(model), **HP)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched, dp_rank, dp_size


def _train(model, opt, sched, dp_rank, dp_size, steps):
    losses = []
    for step in steps:
        loss = model(_batch(step, dp_rank, dp_size)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if torch.distributed.is_initialized():  # the global-batch loss, as one process sees it
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        losses.append(loss)
    return losses


def _state(model, opt):
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    momenta = {
        n: _full(opt.state[p]["momentum_buffer"]).clone()
        for n, p in model.named_parameters()
        if "momentum_buffer" in opt.state[p]
    }
    return {"params": params, "momenta": momenta, "group_steps": [g["step"] for g in opt.param_groups]}


def _uninterrupted():
    """One process, full model, TOTAL steps: the run every resumed run must continue."""
    model, opt, sched, _, _ = _build("plain", 1)
    losses = _train(model, opt, sched, 0, 1, range(1, TOTAL + 1))
    return {"losses": losses, **_state(model, opt)}


# ----------------------------------------------------------------------------- resharding
def _save_body(rank, world_size, kinds, folder):
    """For each kind: SAVE_AT steps, then save. For FSDP2, also check the hidden step that
    get_state_dict runs on a fresh optimizer: rotation counter and params must not move."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from mano_dist.checkpoint import Checkpointer

    out = {}
    for kind in kinds:
        model, opt, sched, dp_rank, dp_size = _build(kind, world_size)
        before = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        get_state_dict(model, opt)  # on the fresh optimizer
        out[kind + ":fresh"] = {
            "steps": [g["step"] for g in opt.param_groups],
            "params_unchanged": all(torch.equal(p.detach().to_local(), before[n]) for n, p in model.named_parameters()),
        }
        losses = _train(model, opt, sched, dp_rank, dp_size, range(1, SAVE_AT + 1))
        Checkpointer(Path(folder) / kind).save(SAVE_AT, model=model, optimizer=opt, scheduler=sched,
                                              extra={"data": {"next_step": SAVE_AT + 1}})
        out[kind] = {"losses": losses, **_state(model, opt)}
    return out


def _resume_body(rank, world_size, sources, folder):
    """For each saved checkpoint: a fresh FSDP2 (or plain) run with other initial weights loads
    it and trains to TOTAL."""
    from mano_dist.checkpoint import Checkpointer

    kind = "fsdp" if world_size > 1 and torch.distributed.is_initialized() else "plain"
    out = {}
    for source in sources:
        model, opt, sched, dp_rank, dp_size = _build(kind, world_size, seed=123)
        info = Checkpointer(Path(folder) / source).load(model=model, optimizer=opt, scheduler=sched)
        loaded = _state(model, opt)
        losses = _train(model, opt, sched, dp_rank, dp_size, range(info["extra"]["data"]["next_step"], TOTAL + 1))
        out[source] = {"info": info, "loaded": loaded, "losses": losses, "lr": sched.get_last_lr(), **_state(model, opt)}
    return out


def _assert_continues(result, expected, label, tol=1e-12):  # float64: the same sums in another order
    assert result["info"]["step"] == SAVE_AT, label
    assert result["loaded"]["group_steps"] == [SAVE_AT, SAVE_AT], (label, result["loaded"]["group_steps"])
    for got, want in zip(result["losses"], expected["losses"][SAVE_AT:]):
        assert abs(float(got) - float(want)) < tol, (label, float(got), float(want))
    worst = 0.0
    for section in ("params", "momenta"):
        for n, want in expected[section].items():
            err = (result[section][n] - want).abs().max().item()
            assert err < tol, f"{label}: {section} {n} differs by {err:.2e}"
            worst = max(worst, err)
    print(f"{label}: max |resumed - uninterrupted| over params and momenta = {worst:.1e}", file=sys.__stderr__)
    assert result["lr"] == [HP["lr"] * 0.5 ** (TOTAL // 2)] * 2, (label, result["lr"])


@pytest.mark.distributed
def test_reshard_fsdp_hsdp_tp_to_other_world_sizes(tmp_path, capsys):
    expected = _uninterrupted()
    saved = run_distributed(_save_body, 2, tmp_path, ["fsdp"], str(tmp_path))
    for r in saved:
        assert r["fsdp:fresh"] == {"steps": [0, 0], "params_unchanged": True}
        for got, want in zip(r["fsdp"]["losses"], expected["losses"]):
            assert abs(float(got) - float(want)) < 1e-9  # the hidden step did not shift the phase
    # world size 4: resume the FSDP2 checkpoint; write HSDP and TP+FSDP2 checkpoints
    saved4 = run_distributed(_save_body, 4, tmp_path, ["hsdp", "tp"], str(tmp_path))
    assert all(r[k + ":fresh"]["params_unchanged"] for r in saved4 for k in ("hsdp", "tp"))
    resumed = {
        3: run_distributed(_resume_body, 3, tmp_path, ["fsdp", "hsdp", "tp"], str(tmp_path)),
        4: run_distributed(_resume_body, 4, tmp_path, ["fsdp"], str(tmp_path)),
        1: [_resume_body(0, 1, ["fsdp", "hsdp", "tp"], str(tmp_path))],  # no process group
    }
    for ws, results in resumed.items():
        for rank, r in enumerate(results):
            for source, result in r.items():
                _assert_continues(result, expected, f"{source} -> ws {ws} rank {rank}")

    # Consolidated export of the FSDP2 checkpoint equals what a world-size-1 load sees.
    from mano_dist.checkpoint.convert import main

    out = tmp_path / "export" / "full.pt"
    assert main([str(tmp_path / "fsdp"), str(out)]) == 0  # run folder -> its newest step
    assert "wrote" in capsys.readouterr().out
    full = torch.load(out, weights_only=False)
    assert full["step"] == SAVE_AT and full["extra"] == {"data": {"next_step": SAVE_AT + 1}}
    loaded = resumed[1][0]["fsdp"]["loaded"]
    assert full["model"].keys() == loaded["params"].keys()
    assert all(torch.equal(full["model"][n], loaded["params"][n]) for n in loaded["params"])
    assert all(torch.equal(full["optim"]["state"][n]["momentum_buffer"], m) for n, m in loaded["momenta"].items())
    assert [g["step"] for g in full["optim"]["param_groups"]] == [SAVE_AT, SAVE_AT]
    model_only = tmp_path / "model.pt"
    assert main([str(tmp_path / "fsdp" / f"step-{SAVE_AT}"), str(model_only), "--model-only"]) == 0
    plain = Net().double()
    plain.load_state_dict(torch.load(model_only))
    assert torch.equal(plain.w3.weight, loaded["params"]["w3.weight"])
    assert main([str(tmp_path / "nowhere"), str(model_only)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_get_state_dict_on_fresh_optimizer_keeps_trajectory():
    """The hidden initialisation step of get_state_dict changes nothing: same bits afterwards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    runs = []
    for probe in (False, True):
        model, opt, sched, _, _ = _build("plain", 1)
        if probe:
            _, osd = get_state_dict(model, opt)
            assert [g["step"] for g in osd["param_groups"]] == [0, 0]
            assert isinstance(osd["param_groups"][0]["step"], int)
            assert osd["param_groups"][0]["param_names"] == opt.param_groups[0]["param_names"]
            assert all(isinstance(n, str) for n in opt.param_groups[0]["param_names"])
        losses = _train(model, opt, sched, 0, 1, range(1, 4))
        runs.append((losses, _state(model, opt)))
    (l0, s0), (l1, s1) = runs
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert all(torch.equal(s0["params"][n], s1["params"][n]) for n in s0["params"])


# ----------------------------------------------------------------------------- exact resume
def _training_script(rank, world_size, folder, kill_after, async_save):
    """A small real training loop: FSDP2, dropout and data drawn from each rank's global RNG
    (so RNG restore matters), a checkpoint every step, optional SIGKILL after a step."""
    from mano_dist import Mano, mano_param_groups
    from mano_dist.checkpoint import Checkpointer

    torch.manual_seed(0)
    model, dp_rank, dp_size = _shard(Net(dropout=0.2), "fsdp", world_size)
    opt = Mano(mano_param_groups(model), **HP)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    torch.manual_seed(100 + rank)
    ckpt = Checkpointer(folder, keep_last=2, async_save=async_save)
    info = ckpt.load(model=model, optimizer=opt, scheduler=sched)  # "auto": None on a fresh folder
    losses = list(info["extra"]["losses"]) if info else []
    for step in range(info["step"] + 1 if info else 1, TOTAL + 1):
        x = torch.randint(0, 11, (GLOBAL_BATCH // dp_size, 4))
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)  # extra is rank 0's
        losses.append(loss)
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, extra={"losses": losses})
        if step == kill_after:
            if kill_after % 2:  # odd: wait for the save; even: die while it may still be writing
                ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.wait()
    return {"losses": losses, "resumed_from": info and info["step"], "params": _state(model, opt)["params"],
            "kept": sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run (sync saves; saving, sync or async, does not touch the trajectory)."""
    tmp = tmp_path_factory.mktemp("straight")
    return run_distributed(_training_script, 2, tmp, str(tmp / "run"), None, False)


@pytest.mark.distributed
@pytest.mark.parametrize("kill_after,async_save", [(SAVE_AT, True), (4, True), (SAVE_AT, False)])
def test_killed_run_resumes_bit_for_bit(tmp_path, straight_run, kill_after, async_save):
    straight = straight_run
    folder = str(tmp_path / "run")
    with pytest.raises(AssertionError, match="exited abnormally"):
        run_distributed(_training_script, 2, tmp_path, folder, kill_after, async_save)
    resumed = run_distributed(_training_script, 2, tmp_path, folder, None, async_save)
    for a, b in zip(straight, resumed):
        assert b["resumed_from"] in ((kill_after,) if kill_after % 2 else (kill_after - 1, kill_after))
        assert len(b["losses"]) == TOTAL
        assert all(torch.equal(x, y) for x, y in zip(a["losses"], b["losses"])), (a["losses"], b["losses"])
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert b["kept"] == [f"step-{TOTAL - 1}", f"step-{TOTAL}"], b["kept"]


# ----------------------------------------------------------------------------- crash safety
def _killed_mid_save(rank, world_size, folder):
    """Save step 1, then die on every rank while step 2's shards are being written."""
    from torch.distributed.checkpoint import filesystem

    from mano_dist.checkpoint import Checkpointer

    model, opt, sched, dp_rank, dp_size = _build("fsdp", world_size)
    ckpt = Checkpointer(folder)
    _train(model, opt, sched, dp_rank, dp_size, [1])
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched, extra={"data": {"next_step": 2}})
    expected = _state(model, opt)  # collective (full_tensor): every rank
    if rank == 0:
        torch.save(expected, Path(folder) / "expected.pt")
    torch.distributed.barrier()
    _train(model, opt, sched, dp_rank, dp_size, [2])
    write = filesystem.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        write(self, plan, planner).wait()
        os.kill(os.getpid(), signal.SIGKILL)

    filesystem.FileSystemWriter.write_data = write_then_die
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)


def _load_after_crash_and_bad_checkpoints(rank, world_size, folder):
    """The previous checkpoint loads; each bad case raises its error on every rank; the process
    group still works afterwards (no rank was left inside a collective)."""
    from mano_dist.checkpoint import Checkpointer

    folder = Path(folder)
    out = {"dirs": sorted(os.listdir(folder))}
    model, opt, sched, dp_rank, dp_size = _build("fsdp", world_size, seed=7)
    ckpt = Checkpointer(folder)
    out["latest"] = ckpt.latest()
    info = ckpt.load(model=model, optimizer=opt, scheduler=sched)
    out["info"] = info
    out["loaded"] = _state(model, opt)
    good = folder / "step-1"
    if rank == 0:
        for name in ("step-7", "step-8", "step-9"):
            shutil.copytree(good, folder / name)
        shard = folder / "step-7" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        shard = folder / "step-8" / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        shard = folder / "step-9" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    torch.distributed.barrier()
    other = _shard(Net(hidden=4).double(), "fsdp", world_size)[0]
    cases = {
        "missing": dict(path=folder / "step-99"),
        "incomplete": dict(path=folder / "step-2.tmp"),
        "other_model": dict(path=good, model=other),
        "truncated": dict(path=folder / "step-7"),
        "corrupted": dict(path=folder / "step-8"),
    }
    from mano_dist.checkpoint import CheckpointError

    for name, case in cases.items():
        kwargs = dict(model=model, optimizer=opt, scheduler=sched)
        if "model" in case:
            kwargs = dict(model=case["model"])
        try:
            ckpt.load(path=case["path"], **kwargs)
            out[name] = None
        except CheckpointError as e:
            out[name] = (type(e).__name__, str(e))
    try:  # without checksums, DCP's own read error is turned into the same error type
        Checkpointer(folder, checksums=False).load(path=folder / "step-9", model=model, optimizer=opt)
        out["truncated_no_checksums"] = None
    except CheckpointError as e:
        out["truncated_no_checksums"] = (type(e).__name__, str(e)[:200])
    flag = torch.ones(1)
    torch.distributed.all_reduce(flag)
    out["still_in_sync"] = flag.item() == world_size
    return out


@pytest.mark.distributed
def test_save_killed_midway_and_bad_checkpoints(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(AssertionError, match="exited abnormally"):
        run_distributed(_killed_mid_save, 2, tmp_path, str(folder))
    assert (folder / "step-2.tmp").is_dir() and not (folder / "step-2").exists()
    expected = torch.load(folder / "expected.pt")
    results = run_distributed(_load_after_crash_and_bad_checkpoints, 2, tmp_path, str(folder))
    for rank, r in enumerate(results):
        assert r["latest"] == str(folder / "step-1") and r["info"]["step"] == 1
        assert r["loaded"]["group_steps"] == [1, 1]
        assert all(torch.equal(r["loaded"]["params"][n], p) for n, p in expected["params"].items())
        assert all(torch.equal(r["loaded"]["momenta"][n], m) for n, m in expected["momenta"].items())
        assert r["missing"][0] == "CheckpointNotFoundError" and "does not exist" in r["missing"][1]
        assert r["incomplete"][0] == "IncompleteCheckpointError", r["incomplete"]
        assert "the newest complete one is" in r["incomplete"][1]
        kind, message = r["other_model"]
        assert kind == "CheckpointMismatchError", r["other_model"]
        assert "'model.w2.weight' has shape [3, 6] in the checkpoint but [4, 6] here" in message, message
        assert r["truncated"][0] == "CorruptCheckpointError" and "__1_0.distcp" in r["truncated"][1]
        assert "truncated" in r["truncated"][1]
        assert r["corrupted"][0] == "CorruptCheckpointError" and "__0_0.distcp" in r["corrupted"][1]
        assert "corrupted" in r["corrupted"][1]
        assert r["truncated_no_checksums"][0] == "CorruptCheckpointError", r["truncated_no_checksums"]
        assert r["still_in_sync"]


def test_single_process_crash_before_marking_keep_last_and_async(tmp_path, monkeypatch):
    """No process group: a save interrupted after DCP wrote everything but before COMPLETE is
    never 'latest'; keep_last prunes; an async save snapshots the state at the call."""
    from mano_dist.checkpoint import Checkpointer, IncompleteCheckpointError, validate

    model, opt, sched, _, _ = _build("plain", 1)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _train(model, opt, sched, 0, 1, [step])
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched)
    assert ckpt.checkpoints() == [str(tmp_path / "step-2"), str(tmp_path / "step-3")]

    def interrupted(path, **kwargs):
        raise KeyboardInterrupt  # stands for a kill between DCP's metadata and the marker

    monkeypatch.setattr(validate, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, model=model, optimizer=opt)
    monkeypatch.undo()
    assert (tmp_path / "step-4.tmp" / ".metadata").exists() and ckpt.latest() == str(tmp_path / "step-3")
    with pytest.raises(IncompleteCheckpointError, match="step-3"):
        ckpt.load(model=model, optimizer=opt, path=tmp_path / "step-4.tmp")

    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    async_ckpt = Checkpointer(tmp_path / "async", async_save=True)
    async_ckpt.save(5, model=model, optimizer=opt, scheduler=sched)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0)  # training moves on while the background thread writes
    async_ckpt.wait()
    assert async_ckpt.latest() == str(tmp_path / "async" / "step-5")
    async_ckpt.load(model=model, optimizer=opt, scheduler=sched)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    assert Checkpointer(tmp_path / "empty").load(model=model) is None

    # RNG states (torch, python, numpy) come back with the checkpoint
    import random

    import numpy as np

    ckpt.save(6, model=model, optimizer=opt, extra={"data": {"offset": 42}})
    drawn = (torch.rand(3), random.random(), np.random.rand())
    info = ckpt.load(model=model, optimizer=opt)
    assert info == {"step": 6, "extra": {"data": {"offset": 42}}, "path": str(tmp_path / "step-6")}
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
    assert ckpt.load(model=model, optimizer=opt, restore_rng=False) is not None
    assert not torch.equal(torch.rand(3), again[0])
