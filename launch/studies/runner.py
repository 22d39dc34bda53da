"""Running the trainer for a study: the optimizers a study names (trainer overrides), where a
run lives, whether it finished, and one single-thread ``launch.train`` process per run. Shared
by the convergence comparison and the token-scaling study."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..trainer.metrics import METRICS_FILE, read_metrics

# study name -> trainer overrides
OPTIMIZERS: dict[str, list[str]] = {
    "adamw": ["optim.name=adamw"],
    "muon": ["optim.name=muon"],
    "mano-v1": ["optim.name=mano", "optim.variant=v1"],
    "mano-v2": ["optim.name=mano", "optim.variant=v2"],
    "mano-both": ["optim.name=mano", "optim.variant=both"],
    "muonmax": ["optim.name=muonmax"],
    "momo-mano": ["optim.name=momo-mano"],
}


def run_dir(out: Path, opt: str, lr: float, seed: int) -> Path:
    return out / opt / f"lr{lr:g}" / f"seed{seed}"


def final_record(folder: Path, steps: int) -> dict | None:
    """The last metrics record if the run reached ``steps``, else None."""
    if not (folder / METRICS_FILE).is_file():
        return None
    recs = read_metrics(folder)
    last = recs[-1] if recs else None
    return last if last and last["step"] == steps and "val_loss" in last else None


def train_one(config: str, out: Path, opt: str, lr: float, seed: int, steps: int) -> tuple[str, float, int]:
    sets = OPTIMIZERS[opt] + [f"optim.lr={lr}", f"train.seed={seed}", f"train.steps={steps}"]
    return train_run(config, run_dir(out, opt, lr, seed), sets, steps)


def train_run(config: str, folder: Path, sets: list[str], steps: int) -> tuple[str, float, int]:
    """One single-thread ``launch.train`` process into ``folder``, skipped if it already finished."""
    if final_record(folder, steps):
        return str(folder), 0.0, 0
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.train", "--config", config, "--out-dir", str(folder), "--resume", "none",
           "--overwrite"]  # an interrupted run starts over
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    secs = time.perf_counter() - t0
    if rc == 0:
        (folder / "elapsed_s").write_text(f"{secs:.1f}\n")
    return str(folder), secs, rc
