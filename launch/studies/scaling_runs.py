"""What a token-scaling run is (optimizer, lr, seed, steps), where its folder lives, and the short
study's best learning rates the scaling plan starts from: shared by the study (``scaling``) and
its report (``scaling_report``), so neither imports the other's module back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Best peak lr per optimizer in the short study (docs/benchmarks.md, "Convergence study").
SHORT_STUDY_BEST_LR = {"adamw": 3e-3, "muon": 1e-2, "mano-v1": 1e-2, "mano-v2": 1e-2, "mano-both": 1e-2,
                       "muonmax": 1e-2, "momo-mano": 1e-2, "mano-v2-fb3e-3": 1e-2}


@dataclass(frozen=True, order=True)
class Run:
    opt: str
    lr: float
    seed: int
    steps: int


def scaling_dir(out: Path, run: Run) -> Path:
    return out / f"steps{run.steps}" / run.opt / f"lr{run.lr:g}" / f"seed{run.seed}"
