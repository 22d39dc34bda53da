"""Preemption (launch/trainer/preemption.py): SIGTERM or SIGUSR1 stops a run at the next step boundary,
every rank at the same step, with a complete checkpoint, and the run resumed with ``--resume
auto`` equals an uninterrupted one bit for bit (losses and final parameters). The signal goes to
torchrun's agent (which forwards it to every worker) or to one worker only; FSDP2 (sync and async
checkpoints) and DeepSpeed ZeRO-2. Plus: the agreement itself (2 ranks, one flagged), and
launch/run.sh turning the workers' marker into exit code 75 and forwarding signals to torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist import run_distributed
from test_recipe import ROOT, SMALL, assert_same_run, ds_json, losses, straight  # noqa: F401

from launch.trainer.preemption import MARKER_ENV, PREEMPTED_EXIT_CODE, Preemption


def _train(out, *extra, faults=(), marker=None, env=None):
    """2 ranks under torchrun (through tests/train_with_faults.py when ``faults``): (torchrun's
    exit code, its output)."""
    entry = ["tests/train_with_faults.py", *faults] if faults else ["-m", "launch.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *entry,
           "--config", "configs/llama_tiny.toml", "--out-dir", str(out), *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if marker is not None:
        env[MARKER_ENV] = str(marker)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, start_new_session=True)
    return proc.returncode, proc.stdout


def _assert_stopped_at(out, folder: str, step: int, output: str, signame: str, marker: Path):
    """The run stopped after ``step``: it said so, the checkpoint is complete and stamped with the
    run's id, every record up to ``step`` was written and none after, and the marker names it."""
    import json

    assert f"preempted by {signame} after step {step}/10: checkpoint" in output, output
    checkpoint = Path(out) / folder / f"step-{step}"
    assert (checkpoint / "COMPLETE").is_file(), sorted(p.name for p in checkpoint.parent.iterdir())
    run_id = json.loads((Path(out) / "run.json").read_text())["run_id"]
    assert json.loads((checkpoint / "run.json").read_text())["run_id"] == run_id
    assert sorted(losses(out)) == list(range(1, step + 1))
    assert marker.read_text() == f"preempted by {signame} after step {step}\n"


@pytest.mark.distributed
def test_sigterm_to_the_agent_stops_at_the_step_and_resumes_bit_for_bit(tmp_path, straight):
    """FSDP2: after step 4 rank 0 sends SIGTERM to torchrun's agent, which forwards it to both
    workers: they save step 4 (not a checkpoint step: every 3) and exit. torchrun itself exits 1
    (it passes no worker's code through; the marker carries it). The resumed run continues at
    step 4 and ends with the uninterrupted run's losses and parameters, bit for bit."""
    cut, marker = tmp_path / "cut", tmp_path / "marker"
    code, output = _train(cut, "--resume", "none", faults=("--signal-at-step", "4", "--signal-to", "agent"),
                          marker=marker)
    assert code == 1 and "Received 15 death signal" in output, output
    _assert_stopped_at(cut, "checkpoints", 4, output, "SIGTERM", marker)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-3", "step-4"]

    code, output = _train(cut, "--resume", "auto", marker=marker)
    assert code == 0, output
    assert "resumed from" in output and "at step 4" in output, output
    assert not marker.exists()  # a finished launch clears what an earlier attempt left
    assert_same_run(straight[0], cut)


@pytest.mark.distributed
def test_sigusr1_to_one_worker_stops_every_rank_with_async_checkpoints(tmp_path, straight):
    """Only rank 1 gets SIGUSR1 after step 4; the agreement stops rank 0 too, at the same step,
    and both exit 75 (torchrun's summary lists each worker's code). Async checkpoints: step 3's is
    completed, then step 4 saved and completed before the exit. Resumed, the run equals the
    uninterrupted (sync) one bit for bit."""
    cut, marker = tmp_path / "cut", tmp_path / "marker"
    async_ = ("--set", "train.async_checkpoint=true")
    code, output = _train(cut, "--resume", "none", *async_, marker=marker,
                          faults=("--signal-at-step", "4", "--signal-to", "self", "--signal-rank", "1",
                                  "--signal-name", "USR1"))
    assert code == 1, output
    ranks = re.findall(rf"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: {PREEMPTED_EXIT_CODE} ", output)
    assert sorted(ranks) == ["0", "1"], output
    _assert_stopped_at(cut, "checkpoints", 4, output, "SIGUSR1", marker)
    assert (cut / "checkpoints" / "step-3" / "run.json").is_file()  # the async one in flight, stamped too

    code, output = _train(cut, "--resume", "auto", *async_)
    assert code == 0 and "at step 4" in output, output
    assert_same_run(straight[0], cut)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_deepspeed_run_preempted_through_the_agent_resumes_bit_for_bit(tmp_path):
    """ZeRO-2, 2 ranks, 6 steps: SIGTERM to the agent after step 4 saves ``ds_checkpoints/step-4``;
    resumed, the losses and the final parameters and Mano state equal an uninterrupted run's."""
    from mano_dist.deepspeed.checkpoint import consolidate

    ds = ("--engine", "deepspeed", "--ds-config", str(ds_json(tmp_path, 2)), "--set", "train.steps=6")
    env = {"DS_ACCELERATOR": "cpu"}
    whole, cut, marker = tmp_path / "whole", tmp_path / "cut", tmp_path / "marker"
    code, output = _train(whole, "--resume", "none", *ds, env=env)
    assert code == 0, output
    code, output = _train(cut, "--resume", "none", *ds, env=env, marker=marker,
                          faults=("--signal-at-step", "4", "--signal-to", "agent"))
    assert code == 1, output
    assert "preempted by SIGTERM after step 4/6: checkpoint" in output, output
    step4 = cut / "ds_checkpoints" / "step-4"
    assert (step4 / "COMPLETE").is_file() and (step4 / "run.json").is_file()
    assert sorted(losses(cut)) == [1, 2, 3, 4] and marker.read_text() == "preempted by SIGTERM after step 4\n"

    code, output = _train(cut, "--resume", "auto", *ds, env=env)
    assert code == 0 and "at step 4" in output, output
    assert losses(cut) == losses(whole)
    a, b = (consolidate(str(d / "ds_checkpoints"), "step-6") for d in (whole, cut))
    assert set(a["params"]) == set(b["params"]) and a["params"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        assert all(torch.equal(v, b["state"][k][key]) for key, v in a["state"][k].items()), k


def _agreement(rank, world_size):
    """Per case, what ``agreed()`` returns on this rank and the host reads it made."""
    from mano_dist.dispatch import DispatchCounter

    out = []
    with Preemption() as p:
        p.connect(torch.device("cpu"))
        with DispatchCounter() as dc:
            out.append(p.agreed())  # nobody signalled
        out.append(dc.host_reads)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        out.append(p.agreed())  # rank 1 only
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: rank 1 keeps its first
        time.sleep(0.05)
        out.append((p.received, p.agreed()))
    out.append(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)  # the handlers are restored
    return out


@pytest.mark.distributed
def test_the_agreement_stops_every_rank_with_one_unread_all_reduce(tmp_path):
    """2 ranks: no signal gives 0 on both, with no host read; SIGUSR1 on rank 1 alone gives 10
    on both; then SIGTERM everywhere: rank 0 records 15, rank 1 keeps 10, both agree on 15 (MAX).
    Leaving the context restores the previous handlers."""
    results = run_distributed(_agreement, 2, tmp_path)
    usr1, term = int(signal.SIGUSR1), int(signal.SIGTERM)
    assert results[0] == [0, 0, usr1, (term, term), True], results
    assert results[1] == [0, 0, usr1, (usr1, term), True], results


FAKE_TORCHRUN = """#!/usr/bin/env bash
# Stands in for python -m torch.distributed.run: records its arguments, then behaves as $FAKE asks.
echo "$*" > "$FAKE_DIR/args"
case $FAKE in
  ok) exit 0 ;;
  fail) exit 1 ;;
  preempted)  # the workers of a preempted launch: marker written, torchrun exits 1
    stop() { echo "got $1" >> "$FAKE_DIR/signals"; echo "preempted by SIG$1 after step 4" > "$MANO_PREEMPTED_FILE"; exit 1; }
    trap 'stop TERM' TERM
    trap 'stop USR1' USR1
    touch "$FAKE_DIR/started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 3 ;;
esac
"""


def _run_sh(tmp_path, fake: str, send: str | None = None):
    python = tmp_path / "python"
    python.write_text(FAKE_TORCHRUN)
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "NPROC_PER_NODE": "2", "FAKE": fake,
           "FAKE_DIR": str(tmp_path), "TMPDIR": str(tmp_path), "USER": "test"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "run.sh"), "--config", "configs/llama_tiny.toml"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(getattr(signal, f"SIG{send}"))
        time.sleep(0.3)
        proc.send_signal(getattr(signal, f"SIG{send}"))  # a second one is not forwarded again
    output = proc.communicate(timeout=60)[0]
    return proc.returncode, output


@pytest.mark.parametrize("fake,send,code", [("ok", None, 0), ("fail", None, 1), ("preempted", "TERM", 75),
                                            ("preempted", "USR1", 75)])
def test_run_sh_forwards_the_signal_once_and_exits_75_on_the_workers_marker(tmp_path, fake, send, code):
    """launch/run.sh with a stand-in torchrun: the signal it gets reaches torchrun once; a marker
    left by the workers makes it exit 75 (and it removes the marker); otherwise torchrun's code;
    torchrun's agent is told to handle SIGUSR1 and to wait 100 s for the workers."""
    got, output = _run_sh(tmp_path, fake, send)
    assert got == code, output
    args = (tmp_path / "args").read_text()
    assert "--max-restarts 3 -m launch.train --config configs/llama_tiny.toml" in args, args
    if send:
        assert (tmp_path / "signals").read_text() == f"got {send}\n"
        assert f"launch/run.sh: preempted by SIG{send} after step 4; exit code 75" in output, output
    assert not list(tmp_path.glob("mano-preempted.*"))


def test_run_sh_exports_the_agent_settings(tmp_path):
    text = (ROOT / "launch" / "run.sh").read_text()
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}" in text
    assert "SIGUSR1" in text.split("export PET_SIGNALS_TO_HANDLE=", 1)[1].splitlines()[0]
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in text
