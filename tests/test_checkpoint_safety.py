"""A received checkpoint must not run its sender's code, and a bad newest checkpoint must not end
a run that has good older ones.

Every case plants a payload (a pickle whose ``__reduce__`` writes a marker file) into one file
of a checkpoint and asserts the clear error (UnsafeCheckpointError naming the file) and that the
marker was never written: ``checkpointer.pt`` (with its manifest left alone, and rewritten by the
attacker too), ``rng/rank-R.pt``, DCP's ``.metadata`` and a pickled item inside ``*.distcp``,
through ``Checkpointer.load``, ``mano-consolidate`` and the DeepSpeed loaders. Also: checkpoints
written the pre-change way still load; ``load("auto")`` / ``load_run(tag=None)`` fall back past
bad checkpoints (never past another model's); failures on one rank before a collective raise on
every rank; the llama32k tokenizer file is refused when its SHA-256 is wrong."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dist import run_distributed
from test_checkpoint import Net, _build, _state, _train


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _saved_run(folder, steps=(1, 2, 3)):
    """One process, plain model: a checkpoint after each of ``steps``; returns the states."""
    from mano_dist.checkpoint import Checkpointer

    model, opt, sched, _, _ = _build("plain", 1)
    ckpt = Checkpointer(folder, keep_last=None)
    states = {}
    for step in steps:
        _train(model, opt, sched, 0, 1, [step])
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, extra={"data": {"next": step + 1}})
        states[step] = _state(model, opt)
    return states


def _rewrite_manifest(folder):
    """What an attacker who also edits the (JSON) manifest does: sizes and CRCs match again."""
    from mano_dist.checkpoint import validate

    validate.write_manifest(Path(folder))


def _fresh():
    model, opt, sched, _, _ = _build("plain", 1, seed=5)
    return model, opt, sched


# ----------------------------------------------------------------------------- Checkpointer
def test_payloads_in_every_pickled_file_are_refused_and_never_run(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from mano_dist.checkpoint import Checkpointer, CorruptCheckpointError, UnsafeCheckpointError

    _saved_run(tmp_path / "run", steps=(1,))
    good = tmp_path / "run" / "step-1"
    marker = tmp_path / "MARKER"
    model, opt, sched = _fresh()
    ckpt = Checkpointer(tmp_path / "run")

    def planted(name, write, manifest_too=True):
        folder = tmp_path / "cases" / name / "step-1"
        shutil.copytree(good, folder)
        write(folder)
        if manifest_too:
            _rewrite_manifest(folder)
        return folder

    def meta_payload(folder):
        torch.save({"format": 1, "step": 1, "extra": {"x": Payload(marker)}, "scheduler": None, "world_size": 1},
                   folder / "checkpointer.pt")

    def distcp_payload(folder):  # a non-tensor item of the optimizer state (DCP pickles those)
        m, o, _ = _fresh()
        msd, osd = get_state_dict(m, o)
        osd["param_groups"][0]["lr"] = Payload(marker)
        for f in folder.glob("*.distcp"):
            f.unlink()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder), no_dist=True)

    cases = {
        "checkpointer.pt, manifest untouched": (planted("meta-only", meta_payload, manifest_too=False),
                                                CorruptCheckpointError, "checkpointer.pt"),
        "checkpointer.pt": (planted("meta", meta_payload), UnsafeCheckpointError, "checkpointer.pt"),
        "rng": (planted("rng", lambda f: torch.save({"torch": Payload(marker)}, f / "rng" / "rank-0.pt")),
                UnsafeCheckpointError, "rank-0.pt"),
        ".metadata": (planted("metadata", lambda f: (f / ".metadata").write_bytes(
            __import__("pickle").dumps(Payload(marker)))), UnsafeCheckpointError, ".metadata"),
        "distcp item": (planted("distcp", distcp_payload), UnsafeCheckpointError, "optim.param_groups.0.lr"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, (folder, error, names) in cases.items():
            with pytest.raises(error) as e:
                ckpt.load(model=model, optimizer=opt, scheduler=sched, path=folder)
            message = str(e.value)
            assert names in message and str(folder) in message, (label, message)
            if error is UnsafeCheckpointError:
                assert "weights_only loading refuses" in message and "load only checkpoints you trust" in message
            else:  # the checksum caught it before anything was unpickled
                assert "truncated or altered" in message or "corrupted" in message, message
            assert not marker.exists(), label
    # the refusal names what was refused: exec is on no allow-list
    with pytest.raises(UnsafeCheckpointError, match="GLOBAL exec was not an allowed global"):
        ckpt.load(model=model, optimizer=opt, path=cases["checkpointer.pt"][0])
    # nothing of a refused checkpoint reached the model: it still holds its own fresh init
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _fresh()[0].parameters()))


def test_checkpoint_written_the_pre_change_way_still_loads(tmp_path):
    """Format 1 as the code before this change wrote it: plain torch.save of checkpointer.pt
    and of rng.capture() (numpy's MT19937 state as an ndarray), manifest, COMPLETE, rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from mano_dist.checkpoint import Checkpointer, layout, rng, validate

    model, opt, sched, _, _ = _build("plain", 1)
    _train(model, opt, sched, 0, 1, [1, 2, 3])
    want = _state(model, opt)
    tmp = tmp_path / "step-3.tmp"
    (tmp / "rng").mkdir(parents=True)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(9)
    torch.save(rng.capture(), tmp / "rng" / "rank-0.pt")
    torch.save({"format": 1, "step": 3, "extra": {"data": {"sequences_seen": 96}},
                "scheduler": sched.state_dict(), "world_size": 1}, tmp / "checkpointer.pt")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=True)
    validate.write_manifest(tmp)
    (tmp / layout.COMPLETE).write_text("complete\n")
    os.rename(tmp, tmp_path / "step-3")
    expected_draws = (torch.rand(2), random.random(), np.random.rand())

    model2, opt2, sched2 = _fresh()
    info = Checkpointer(tmp_path).load(model=model2, optimizer=opt2, scheduler=sched2)
    assert info == {"step": 3, "extra": {"data": {"sequences_seen": 96}}, "path": str(tmp_path / "step-3")}
    got = _state(model2, opt2)
    assert all(torch.equal(got["params"][n], p) for n, p in want["params"].items())
    assert all(torch.equal(got["momenta"][n], m) for n, m in want["momenta"].items())
    assert got["group_steps"] == want["group_steps"] == [3, 3]
    assert sched2.state_dict() == sched.state_dict()
    draws = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_auto_falls_back_to_the_newest_loadable_checkpoint(tmp_path):
    from mano_dist.checkpoint import (Checkpointer, CheckpointError, CheckpointMismatchError,
                                      UnsafeCheckpointError)

    folder = tmp_path / "run"
    states = _saved_run(folder, steps=(1, 2, 3))
    marker = tmp_path / "MARKER"
    torch.save({"step": 3, "extra": Payload(marker)}, folder / "step-3" / "checkpointer.pt")
    _rewrite_manifest(folder / "step-3")
    shard = next((folder / "step-2").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated (manifest untouched)
    model, opt, sched = _fresh()
    ckpt = Checkpointer(folder)
    with pytest.warns(UserWarning) as caught:
        info = ckpt.load(model=model, optimizer=opt, scheduler=sched)
    skipped = [str(w.message) for w in caught if "Skipping checkpoint" in str(w.message)]
    assert len(skipped) == 2, skipped
    assert str(folder / "step-3") in skipped[0] and "weights_only loading refuses" in skipped[0]
    assert str(folder / "step-2") in skipped[1] and "truncated or altered" in skipped[1]
    assert info["step"] == 1 and info["extra"] == {"data": {"next": 2}}
    got = _state(model, opt)
    assert all(torch.equal(got["params"][n], p) for n, p in states[1]["params"].items())
    assert got["group_steps"] == [1, 1] and sched.last_epoch == 1
    assert not marker.exists()
    # an explicit path is never replaced by another
    with pytest.raises(UnsafeCheckpointError, match="step-3"):
        ckpt.load(model=model, optimizer=opt, path=folder / "step-3")
    # another model: raised at once, no fallback to older checkpoints
    clean = Checkpointer(tmp_path / "clean")
    for step in (1, 2):
        clean.save(step, model=Net().double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointMismatchError, match=r"'model.w2.weight' has shape \[3, 6\] in the checkpoint "
                                                          r"but \[4, 6\] here"):
            clean.load(model=Net(hidden=4).double())
    assert not [w for w in caught if "Skipping" in str(w.message)]
    # nothing loadable: one error naming every checkpoint and why, not a silent fresh start
    (folder / "step-1" / "checkpointer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="No checkpoint in .* can be loaded") as e:
        ckpt.load(model=model, optimizer=opt)
    assert all(f"step-{s}" in str(e.value) for s in (1, 2, 3))
    assert not marker.exists()


def test_save_refuses_extra_that_could_not_be_loaded_back(tmp_path):
    from mano_dist.checkpoint import Checkpointer, CheckpointError

    model, opt, sched = _fresh()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=model, optimizer=opt, extra={"data": {"offset": 7}, "t": torch.ones(2), "k": (1, "a")})
    with pytest.raises(CheckpointError, match="extra / scheduler state hold objects that weights_only") as e:
        ckpt.save(2, model=model, optimizer=opt, extra={"data": Path("x")})
    assert "PosixPath" in str(e.value)
    assert ckpt.checkpoints() == [str(tmp_path / "step-1")]
    info = ckpt.load(model=model, optimizer=opt)
    assert info["step"] == 1 and info["extra"]["k"] == (1, "a") and torch.equal(info["extra"]["t"], torch.ones(2))
    # written through temporary names: none is left behind, and the manifest lists every file
    files = sorted(p.name for p in (tmp_path / "step-1").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".partial")]
    assert set(json.loads((tmp_path / "step-1" / "manifest.json").read_text())["files"]) == {
        ".metadata", "__0_0.distcp", "checkpointer.pt", "rng/rank-0.pt"}


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from mano_dist.checkpoint import validate

    target = tmp_path / "manifest.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(validate.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        validate.write_atomic(target, b"new contents")
    assert target.read_text() == "old"


def test_checkpointer_module_has_no_import_time_warning_filter():
    import subprocess

    """(What torch and the package root install is theirs: imported first.)"""
    code = ("import warnings, torch, torch.distributed.checkpoint, mano_dist; before = list(warnings.filters); "
            "import mano_dist.checkpoint.checkpointer, mano_dist.checkpoint.convert, mano_dist.checkpoint.safe; "
            "print(warnings.filters == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr


# ----------------------------------------------------------------------------- 2 ranks
def _two_rank_body(rank, world_size, folder, marker):
    """Payload in rank 1's RNG file (manifest rewritten): both ranks raise, neither runs it;
    auto falls back to step 1 on both; failures on one rank before a collective in save raise
    on every rank; the group is still in sync afterwards."""
    import torch.distributed as dist

    from mano_dist.checkpoint import Checkpointer, CheckpointError, checkpointer

    folder = Path(folder)
    model, opt, sched, dp_rank, dp_size = _build("fsdp", world_size)
    ckpt = Checkpointer(folder, keep_last=None)
    for step in (1, 2):
        _train(model, opt, sched, dp_rank, dp_size, [step])
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched)
        if step == 1:
            saved = _state(model, opt)
    if rank == 0:
        torch.save({"torch": Payload(marker), "python": None}, folder / "step-2" / "rng" / "rank-1.pt")
        _rewrite_manifest(folder / "step-2")
    dist.barrier()
    out = {}
    try:
        ckpt.load(model=model, optimizer=opt, path=folder / "step-2")
    except CheckpointError as e:
        out["explicit"] = (type(e).__name__, str(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = ckpt.load(model=model, optimizer=opt, scheduler=sched)
    out["auto"] = (info["step"], [str(w.message) for w in caught if "Skipping" in str(w.message)])
    out["loaded"] = _state(model, opt)
    out["saved_step1"] = saved
    out["marker"] = os.path.exists(marker)

    # a rank-local failure before DCP's collective write: rank 1 cannot write its RNG file
    real = checkpointer.validate.save_atomic
    if rank == 1:
        def broken(obj, path):
            raise OSError(13, "Permission denied", str(path))
        checkpointer.validate.save_atomic = broken
    try:
        ckpt.save(3, model=model, optimizer=opt)
        out["rng_write"] = None
    except CheckpointError as e:
        out["rng_write"] = str(e)
    checkpointer.validate.save_atomic = real
    # rank 0 cannot clear a stale step-4.tmp
    if rank == 0:
        (folder / "step-4.tmp").mkdir()
    real_rmtree = checkpointer.shutil.rmtree
    if rank == 0:
        def no_rmtree(path, *a, **k):
            raise PermissionError(13, "Permission denied", str(path))
        checkpointer.shutil.rmtree = no_rmtree
    try:
        ckpt.save(4, model=model, optimizer=opt)
        out["prepare"] = None
    except CheckpointError as e:
        out["prepare"] = str(e)
    checkpointer.shutil.rmtree = real_rmtree
    flag = torch.ones(1)
    dist.all_reduce(flag)
    out["in_sync"] = flag.item() == world_size
    out["latest"] = ckpt.latest()
    return out


@pytest.mark.distributed
def test_two_ranks_agree_on_refusals_fallback_and_save_failures(tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "MARKER"
    results = run_distributed(_two_rank_body, 2, tmp_path, str(folder), str(marker), timeout=240)
    assert not marker.exists()
    for rank, r in enumerate(results):
        kind, message = r["explicit"]
        assert kind == "UnsafeCheckpointError" and "rng/rank-1.pt" in message, (rank, message)
        assert "weights_only loading refuses" in message
        step, skipped = r["auto"]
        assert step == 1 and len(skipped) == 1 and str(folder / "step-2") in skipped[0], (rank, r["auto"])
        assert all(torch.equal(r["loaded"]["params"][n], p) for n, p in r["saved_step1"]["params"].items())
        assert r["loaded"]["group_steps"] == [1, 1]
        assert r["rng_write"] is not None and "rank 1" in r["rng_write"] and "Permission denied" in r["rng_write"]
        assert r["prepare"] is not None and "step-4.tmp" in r["prepare"] and "Permission denied" in r["prepare"]
        assert r["in_sync"] and r["latest"] == str(folder / "step-2") and not r["marker"]


# ----------------------------------------------------------------------------- mano-consolidate
def test_consolidate_refuses_payloads_and_writes_through_a_temporary_file(tmp_path, capsys):
    from mano_dist.checkpoint import convert

    states = _saved_run(tmp_path / "run", steps=(1, 2))
    marker = tmp_path / "MARKER"
    out = tmp_path / "full.pt"
    assert convert.main([str(tmp_path / "run"), str(out)]) == 0
    full = torch.load(out, weights_only=True)
    assert full["step"] == 2 and full["extra"] == {"data": {"next": 3}} and full["scheduler"]["last_epoch"] == 2
    assert all(torch.equal(full["model"][n], p) for n, p in states[2]["params"].items())
    assert not (tmp_path / "full.pt.tmp").exists()
    before = out.read_bytes()

    torch.save({"step": 2, "extra": Payload(marker), "scheduler": None}, tmp_path / "run" / "step-2" / "checkpointer.pt")
    _rewrite_manifest(tmp_path / "run" / "step-2")
    assert convert.main([str(tmp_path / "run" / "step-2"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "checkpointer.pt" in err and "weights_only loading refuses" in err, err
    # a plain DCP folder (no manifest): its .metadata is a pickle too
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "run" / "step-1", plain)
    for name in ("checkpointer.pt", "manifest.json", "COMPLETE"):
        (plain / name).unlink()
    shutil.rmtree(plain / "rng")
    (plain / ".metadata").write_bytes(__import__("pickle").dumps(Payload(marker)))
    assert convert.main([str(plain), str(out), "--model-only"]) == 1
    assert ".metadata" in capsys.readouterr().err
    assert not marker.exists()
    assert out.read_bytes() == before and not (tmp_path / "full.pt.tmp").exists()  # the old output is intact


# ----------------------------------------------------------------------------- tokenizer
def test_llama32k_file_with_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    from launch.data import tokenizer

    monkeypatch.setenv("MANO_DIST_TOKENIZERS", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    cached = tmp_path / "llama32k.model"
    cached.write_bytes(b"not the pinned model")
    with pytest.raises(tokenizer.TokenizerError) as e:
        tokenizer.load_tokenizer("llama32k")
    message = str(e.value)
    assert str(cached) in message and tokenizer.LLAMA32K_SHA256 in message
    assert tokenizer.sha256_file(cached) in message and "python -m launch.tokenizer fetch" in message
    assert "delete it" in message
    monkeypatch.undo()

    # an installed mistral-common whose file differs from the pinned one
    fake = tmp_path / "pkg" / "mistral_common"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "tokenizer.model.v1").write_bytes(b"another version")
    monkeypatch.setenv("MANO_DIST_TOKENIZERS", str(tmp_path / "empty"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    # recorded as absent first, so the fake module imported below leaves sys.modules with the test
    # (a later `import transformers` in this process would find it and fail on its missing version)
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    monkeypatch.delitem(sys.modules, "mistral_common")
    with pytest.raises(tokenizer.TokenizerError, match="installed mistral-common") as e:
        tokenizer.llama32k_path()
    assert str(fake / "data" / "tokenizer.model.v1") in str(e.value) and tokenizer.LLAMA32K_WHEEL in str(e.value)


def test_llama32k_good_copy_is_used(tmp_path, monkeypatch):
    from launch.data import tokenizer

    try:
        source = tokenizer.llama32k_path()
    except tokenizer.TokenizerError:
        pytest.skip("no llama32k copy on this machine")
    monkeypatch.setenv("MANO_DIST_TOKENIZERS", str(tmp_path))
    shutil.copy(source, tmp_path / "llama32k.model")
    assert tokenizer.llama32k_path() == tmp_path / "llama32k.model"
    with open(tmp_path / "llama32k.model", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(tokenizer.TokenizerError, match="has SHA-256"):
        tokenizer.llama32k_path()
