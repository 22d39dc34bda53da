"""How large is each optimizer's step, really? The update RMS of the hidden matrices, measured.

    python -m launch.update_rms [--config configs/llama_study.toml] [--runs adamw:3e-3 mano-v2:1e-2 muon:1e-2]

Mano scales its unit-norm update by ``0.2 * sqrt(n)`` so that the update ``u`` in
``W <- W (1 - lr wd) - lr u`` has an RMS of 0.2, "like a typical AdamW step"; Muon's
``match_rms_adamw`` aims at the same 0.2. Whether an AdamW lr can then be reused depends on
AdamW's actual update RMS in *this* model, which nobody measured for it. This trains the study's
model with the real trainer (``launch.train``, one process) and, after every step, recovers
``u = (W_before - W_after) / lr - wd W_before`` for each hidden matrix (the ones Mano would
update). It prints the median over matrices at a few points of the run and ``lr x RMS(u)``, the
size of the step actually taken, and writes every step's numbers to ``--out/update_rms.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def update_rms(before: torch.Tensor, after: torch.Tensor, lr: float, weight_decay: float) -> float:
    """RMS of ``u`` in ``after = before (1 - lr wd) - lr u`` (decoupled decay, as every optimizer here)."""
    u = (before.double() - after.double()) / lr - weight_decay * before.double()
    return u.pow(2).mean().sqrt().item()


class UpdateMeter:
    """A trainer callback: the update RMS of every hidden matrix at every step from the second on
    (the first step's ``before`` is the initial weights, which the callback never sees)."""

    def __init__(self, weight_decay: float):
        self.weight_decay = weight_decay
        self.before: dict[str, torch.Tensor] | None = None
        self.lr: float | None = None
        self.steps: list[dict] = []

    def __call__(self, trainer, step: int) -> None:
        from mano_dist.param_groups import classify_parameters

        matrices = {name: p.detach().clone() for name, p in classify_parameters(trainer.engine.module)[0]}
        if self.before is not None:
            rms = {n: update_rms(self.before[n], w, self.lr, self.weight_decay) for n, w in matrices.items()}
            self.steps.append({"step": step, "lr": self.lr, "rms": rms})
        self.before, self.lr = matrices, trainer.engine.lr  # the lr of the next step


def measure(config: str, opt: str, lr: float, out: Path, sets: list[str]) -> UpdateMeter:
    """One training run of ``opt`` at peak ``lr`` with the meter attached."""
    from . import train
    from .compare import OPTIMIZERS
    from .config import load_config

    overrides = OPTIMIZERS[opt] + [f"optim.lr={lr}"] + sets
    meter = UpdateMeter(load_config(config, overrides).optim.weight_decay)
    argv = ["--config", config, "--out-dir", str(out / f"{opt}_lr{lr:g}"), "--resume", "none"]
    for s in overrides:
        argv += ["--set", s]
    if train.main(argv, callbacks=[meter]) != 0:
        raise SystemExit(f"training {opt} at lr {lr:g} failed")
    return meter


def summary_row(opt: str, lr: float, meter: UpdateMeter) -> str:
    """Median RMS(u) over matrices at the 2nd step, 10 %, 50 % and the end of the run; the mean
    over the run of lr x RMS(u) (the step actually taken, per weight)."""
    steps = meter.steps
    pick = [steps[0], steps[len(steps) // 10], steps[len(steps) // 2], steps[-1]]
    cells = [f"{statistics.median(s['rms'].values()):.3f}" for s in pick]
    taken = statistics.mean(s["lr"] * statistics.median(s["rms"].values()) for s in steps)
    return f"| {opt} | {lr:g} | " + " | ".join(cells) + f" | {taken:.2e} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.update_rms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_study.toml")
    ap.add_argument("--runs", nargs="+", default=["adamw:3e-3", "mano-v2:1e-2", "muon:1e-2"],
                    help="optimizer:peak_lr pairs (optimizers as in launch.compare)")
    ap.add_argument("--out", type=Path, default=Path("runs/update_rms"))
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)

    from .compare import OPTIMIZERS

    runs = []
    for item in args.runs:
        opt, _, lr = item.partition(":")
        if opt not in OPTIMIZERS or not lr:
            ap.error(f"--runs {item!r}: want optimizer:lr with optimizer one of {sorted(OPTIMIZERS)}")
        runs.append((opt, float(lr)))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    for opt, lr in runs:
        meter = measure(args.config, opt, lr, args.out, args.sets)
        rows.append(summary_row(opt, lr, meter))
        records += [{"opt": opt, "peak_lr": lr, **s} for s in meter.steps]
    (args.out / "update_rms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print("\nupdate RMS of the hidden matrices (median over matrices), u in W <- W (1 - lr wd) - lr u")
    print("| optimizer | peak lr | step 2 | 10 % | 50 % | end | mean lr x RMS(u) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from .train import exit_now

    exit_now(main())
