"""Timing the real trainer: one torchrun of ``launch.train`` with per-step logging, and the
medians of its metrics after the warm-up (tokens/s, step time, time inside ``optimizer.step()``).
Shared by the throughput and switch-cost measurements."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from ..trainer.metrics import read_metrics

WARMUP = 5


def measure(name: str, config: str, steps: int, nproc: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "launch.train", "--config", config, "--out-dir", str(out), "--resume", "none", "--overwrite",
           "--set", f"optim.name={name}", "--set", f"train.steps={steps}", "--set", "train.log_every=1",
           "--set", f"train.eval_every={steps}", "--set", "train.eval_sequences=8",
           "--set", f"train.checkpoint_every={steps}"]
    for s in extra:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{name}: trainer failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    recs = read_metrics(out)[WARMUP:]
    tok_s = statistics.median(r["tokens_per_s"] for r in recs)
    opt_s = statistics.median(r["opt_step_s"] for r in recs)
    step_tokens = recs[0]["tokens"] / recs[0]["step"]
    step_s = step_tokens / tok_s
    return {"tokens_per_s": tok_s, "step_s": step_s, "opt_s": opt_s}
