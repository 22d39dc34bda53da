"""Two runs sharing an output folder must not mix (launch/trainer/run_identity.py): a second run on a
locked folder fails at once; ``--resume none`` refuses a folder holding checkpoints unless
``--overwrite`` (which deletes them); a resume refuses a checkpoint of another run, or a config
that changed what a resume must keep; a folder with copied checkpoints takes their identity.
Decided by rank 0 and broadcast: with 2 ranks both raise the same error, none hangs, and a
refusal deletes nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist import run_distributed
from test_recipe import ROOT, SMALL


def _cfg(out, *overrides):
    from launch.config import load_config

    cfg = load_config(ROOT / "configs" / "llama_tiny.toml", list(overrides))
    cfg.train.out_dir = str(out)
    return cfg


def _checkpoint(out, step: int, run_id: str | None, folder="checkpoints", seed=0):
    """A complete step folder as the savers leave it (only what ``claim`` reads: the COMPLETE
    marker, a payload file) and, unless ``run_id`` is None, the trainer's stamp."""
    from launch.trainer.run_identity import fingerprint

    path = Path(out) / folder / f"step-{step}"
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("complete\n")
    (path / "payload.distcp").write_bytes(b"x" * 8)
    if run_id is not None:
        stamp = {"run_id": run_id, "fingerprint": fingerprint(_cfg(out, f"train.seed={seed}")), "step": step}
        (path / "run.json").write_text(json.dumps(stamp))
    return path


def _folder_json(out, run_id: str, seed=0):
    from launch.trainer.run_identity import fingerprint

    Path(out).mkdir(parents=True, exist_ok=True)
    identity = {"run_id": run_id, "fingerprint": fingerprint(_cfg(out, f"train.seed={seed}"))}
    (Path(out) / "run.json").write_text(json.dumps(identity))


def _tree(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def _without(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if k != "run.lock"}  # the lock file names its last holder


def _without_lock(out) -> dict[str, bytes]:
    return _without(_tree(out))


def _claims(rank, world_size, cases):
    """Per case (out_dir, resume, overwrite, overrides): ("ok", run_id, notes) or ("error", text)."""
    from launch.trainer.run_identity import RunFolderError, claim

    results = []
    for out, resume, overwrite, overrides in cases:
        try:
            with claim(_cfg(out, *overrides), resume, overwrite, rank) as folder:
                results.append(("ok", folder.run_id, folder.notes))
        except RunFolderError as e:
            results.append(("error", str(e)))
    return results


@pytest.mark.distributed
def test_claims_on_two_ranks_agree_refuse_and_delete_only_when_told(tmp_path):
    """One spawned 2-rank group, one case after another (each rank sees every outcome alike)."""
    a_dir = tmp_path / "a"  # run A left step-2 and step-4
    _folder_json(a_dir, "aaaa")
    for step in (2, 4):
        _checkpoint(a_dir, step, "aaaa")
    a_before = _tree(a_dir)
    mixed = tmp_path / "mixed"  # run B's folder with a checkpoint of run A copied in
    _folder_json(mixed, "bbbb")
    _checkpoint(mixed, 2, "bbbb")
    _checkpoint(mixed, 4, "aaaa")
    copied = tmp_path / "copied"  # checkpoints copied to a new place, no run.json
    _checkpoint(copied, 9, "cccc")
    legacy = tmp_path / "legacy"  # checkpoints from before run identities
    _checkpoint(legacy, 3, None)
    mixed_before = _tree(mixed)
    cases = [
        (tmp_path / "fresh", "none", False, []),
        (a_dir, "none", False, ["train.seed=1"]),              # run B on run A's folder
        (a_dir, "auto", False, ["train.seed=1"]),              # ... or resuming it with another seed
        (a_dir, "auto", False, []),                            # run A continues
        (mixed, "auto", False, []),
        (mixed, str(mixed / "checkpoints" / "step-4"), False, []),
        (copied, "auto", False, []),
        (legacy, "auto", False, []),
    ]
    results = run_distributed(_claims, 2, tmp_path, cases)
    assert results[0] == results[1], results
    fresh, b_on_a, seed_changed, a_again, mixed_auto, mixed_path, adopted, old = results[0]
    assert _without_lock(a_dir) == a_before  # refusals deleted nothing

    assert fresh[0] == "ok" and json.loads((tmp_path / "fresh" / "run.json").read_text())["run_id"] == fresh[1]
    assert b_on_a[0] == "error" and b_on_a[1].startswith(
        f"--resume none: {a_dir} already holds checkpoints of run aaaa (checkpoints/step-2, checkpoints/step-4); "
        "nothing was deleted."), b_on_a
    assert "--overwrite" in b_on_a[1]
    assert seed_changed == ("error", f"this config differs from run aaaa's ({a_dir / 'run.json'}) in what a resume "
                                     "must keep: seed 0 there, 1 here. Resume with the run's settings, or start a "
                                     "new run (another --out-dir, or --resume none --overwrite)"), seed_changed
    assert a_again[:2] == ("ok", "aaaa") and a_again[2] == ["run aaaa (resuming)"]
    for refused in (mixed_auto, mixed_path):
        assert refused[0] == "error" and refused[1].startswith(
            f"checkpoint {mixed / 'checkpoints' / 'step-4'} belongs to run aaaa, but {mixed / 'run.json'} to run "
            "bbbb"), refused
    assert _without_lock(mixed) == mixed_before
    assert adopted[:2] == ("ok", "cccc") and json.loads((copied / "run.json").read_text())["run_id"] == "cccc"
    assert old[0] == "ok" and old[1] not in ("aaaa", "bbbb", "cccc") and "predate run identities" in old[2][0]

    (overwritten,), again = run_distributed(_claims, 2, tmp_path, [(a_dir, "none", True, ["train.seed=1"])])
    assert again == [overwritten] and overwritten[0] == "ok" and overwritten[1] != "aaaa", overwritten
    assert overwritten[2][0] == "--overwrite: deleted 2 old checkpoint(s) of run aaaa", overwritten
    assert not (a_dir / "checkpoints" / "step-2").exists() and not (a_dir / "checkpoints" / "step-4").exists()
    assert json.loads((a_dir / "run.json").read_text())["run_id"] == overwritten[1]


def _train(out, *extra, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "launch.train",
           "--config", "configs/llama_tiny.toml", "--out-dir", str(out), *SMALL, "--set", "train.steps=4",
           "--set", "train.checkpoint_every=2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, start_new_session=True)
    return proc.returncode, proc.stdout


def _stamps(out) -> dict[str, str]:
    stamps = sorted((out / "checkpoints").glob("step-*/run.json"))
    return {p.parent.name: json.loads(p.read_text())["run_id"] for p in stamps}


@pytest.mark.distributed
def test_the_reproduced_mix_is_refused_end_to_end(tmp_path):
    """2 ranks under torchrun, the issue's scenario: run A saves step-2 and step-4; run B
    (``--resume none``, another seed) is refused and A's files are untouched; while the folder
    is locked (by this test, as a live run would hold it) a run fails at once with the holder's
    name; ``--overwrite`` starts B over, and every checkpoint then carries B's id."""
    out = tmp_path / "run"
    code, output = _train(out, "--resume", "none")
    assert code == 0, output
    run_a = json.loads((out / "run.json").read_text())["run_id"]
    assert _stamps(out) == {"step-2": run_a, "step-4": run_a}
    before = _tree(out)

    code, output = _train(out, "--resume", "none", "--set", "train.seed=1", timeout=120)
    assert code != 0 and f"error: --resume none: {out} already holds checkpoints of run {run_a}" in output, output
    assert _without_lock(out) == _without(before)

    with open(out / "run.lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("pid 1234 on test-host since now\n")
        lock.flush()
        code, output = _train(out, "--resume", "auto", timeout=120)
    assert code != 0 and (f"error: {out} is in use by another run (pid 1234 on test-host since now): "
                          f"{out / 'run.lock'} is locked") in output, output
    assert _without_lock(out) == _without(before)

    code, output = _train(out, "--resume", "none", "--overwrite", "--set", "train.seed=1")
    assert code == 0 and f"--overwrite: deleted 2 old checkpoint(s) of run {run_a}" in output, output
    run_b = json.loads((out / "run.json").read_text())["run_id"]
    assert run_b != run_a and _stamps(out) == {"step-2": run_b, "step-4": run_b}


def test_overwrite_without_resume_none_is_refused(tmp_path, capsys):
    from launch.trainer.loop import main

    assert main(["--config", "configs/llama_tiny.toml", "--out-dir", str(tmp_path / "x"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite deletes a folder's checkpoints for a fresh start: it goes with --resume none" in err
    assert not (tmp_path / "x").exists()
