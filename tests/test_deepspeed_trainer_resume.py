"""The trainer on DeepSpeed resumes at another number of ranks: `--engine deepspeed --resume PATH`
after a 2-rank run stopped, on 1 rank, continues the LR schedule and the data order of an
uninterrupted 1-rank run (the converter restores weights, Mano's state, schedule, counters)."""

from __future__ import annotations

import pytest

from tests.test_recipe import ds_json, losses, torchrun

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed, pytest.mark.slow]

ENV = {"DS_ACCELERATOR": "cpu"}
ONE_RANK = ("--standalone", "--nproc-per-node", "1")


def _run(out_dir, *extra, launcher=("--standalone", "--nproc-per-node", "2"), ok=True, crash=()):
    # ZeRO-2 JSON without batch keys: the trainer derives them for 2 ranks and for 1 alike
    ds = ("--engine", "deepspeed", "--ds-config", str(ds_json(out_dir.parent, 2)))
    proc = torchrun(out_dir, *ds, *extra, launcher=launcher, env=ENV, crash=crash)
    output = proc.communicate(timeout=600)[0]
    assert (proc.returncode == 0) == ok, output
    return output


def _records(out_dir):
    import json

    return {r["step"]: r for r in map(json.loads, open(out_dir / "metrics.jsonl"))}


def test_deepspeed_run_resumes_on_fewer_ranks(tmp_path):
    whole = tmp_path / "whole-1rank"
    _run(whole, "--resume", "none", launcher=ONE_RANK)
    cut = tmp_path / "cut"
    _run(cut, "--resume", "none", crash=(4,), ok=False)  # saved step 3
    checkpoint = cut / "ds_checkpoints" / "step-3"
    assert checkpoint.is_dir()
    output = _run(cut, "--resume", str(checkpoint), launcher=ONE_RANK)
    assert "at step 3" in output and "no RNG state" not in output, output
    got, want = _records(cut), _records(whole)
    assert sorted(got) == sorted(want)
    for step in range(4, 11):
        # the schedule continues (not restarted at warmup) and the batches are the same ones
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9), step
        assert got[step]["tokens"] == want[step]["tokens"], step
        # steps 1-3 ran on 2 ranks: only the reduction order differs
        assert abs(got[step]["loss"] - want[step]["loss"]) < 1e-3, (step, got[step]["loss"], want[step]["loss"])
    assert losses(cut)[10] < losses(cut)[1]
