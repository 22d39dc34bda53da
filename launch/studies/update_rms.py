"""How large is each optimizer's step, really? The update RMS of the hidden matrices, measured.

    python -m launch.studies.update_rms [--config configs/llama_study.toml] [--runs adamw:3e-3 mano-v2:1e-2 muon:1e-2]

Mano scales its unit-norm update by ``0.2 * sqrt(n)`` so that the update ``u`` in
``W <- W (1 - lr wd) - lr u`` has an RMS of 0.2, "like a typical AdamW step"; Muon's
``match_rms_adamw`` aims at the same 0.2. Whether an AdamW lr can then be reused depends on
AdamW's actual update RMS in *this* model, which nobody measured for it. This trains the study's
model with the real trainer (``launch.train``, one process) and, after every step, recovers
``u = (W_before - W_after) / lr - wd W_before`` for each hidden matrix (the ones Mano would
update). It prints the median over matrices at a few points of the run, its lr-weighted mean,
the spread over matrices and ``lr x RMS(u)``, the size of the step actually taken, and writes
every step's numbers to ``--out/update_rms.jsonl`` (``--from-jsonl`` prints the table again).
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
    from ..config import load_config
    from ..trainer import loop as train
    from .runner import OPTIMIZERS

    overrides = OPTIMIZERS[opt] + [f"optim.lr={lr}"] + sets
    meter = UpdateMeter(load_config(config, overrides).optim.weight_decay)
    argv = ["--config", config, "--out-dir", str(out / f"{opt}_lr{lr:g}"), "--resume", "none", "--overwrite"]
    for s in overrides:
        argv += ["--set", s]
    if train.main(argv, callbacks=[meter]) != 0:
        raise SystemExit(f"training {opt} at lr {lr:g} failed")
    return meter


HEADER = ("| optimizer | peak lr | step 2 | 10 % | 50 % | end | lr-weighted mean | matrices at 50 % | mean lr x RMS |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def summary_rows(records: list[dict]) -> list[str]:
    """Per (optimizer, peak lr): the median RMS(u) over matrices at the 2nd step, 10 %, 50 % and
    the end of the run; its mean weighted by the lr (what the weights actually moved by, per unit
    lr); the range over matrices at 50 %; and the mean of lr x RMS(u) (the step taken)."""
    runs: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        runs.setdefault((r["opt"], r["peak_lr"]), []).append(r)
    rows = []
    for (opt, peak), steps in runs.items():
        med = [statistics.median(s["rms"].values()) for s in steps]
        pick = [med[0], med[len(med) // 10], med[len(med) // 2], med[-1]]
        weighted = sum(s["lr"] * m for s, m in zip(steps, med)) / sum(s["lr"] for s in steps)
        mid = steps[len(steps) // 2]["rms"].values()
        taken = statistics.mean(s["lr"] * m for s, m in zip(steps, med))
        rows.append(f"| {opt} | {peak:g} | " + " | ".join(f"{v:.3f}" for v in pick)
                    + f" | {weighted:.3f} | {min(mid):.3f}-{max(mid):.3f} | {taken:.2e} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.studies.update_rms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_study.toml")
    ap.add_argument("--runs", nargs="+", default=["adamw:3e-3", "mano-v2:1e-2", "muon:1e-2"],
                    help="optimizer:peak_lr pairs (optimizers as in launch.studies.compare)")
    ap.add_argument("--out", type=Path, default=Path("runs/update_rms"))
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE")
    ap.add_argument("--from-jsonl", type=Path, default=None, help="print the table of an earlier update_rms.jsonl")
    args = ap.parse_args(argv)
    if args.from_jsonl:
        records = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        print(HEADER + "\n" + "\n".join(summary_rows(records)))
        return 0

    from .runner import OPTIMIZERS

    runs = []
    for item in args.runs:
        opt, _, lr = item.partition(":")
        if opt not in OPTIMIZERS or not lr:
            ap.error(f"--runs {item!r}: want optimizer:lr with optimizer one of {sorted(OPTIMIZERS)}")
        runs.append((opt, float(lr)))
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for opt, lr in runs:
        meter = measure(args.config, opt, lr, args.out, args.sets)
        records += [{"opt": opt, "peak_lr": lr, **s} for s in meter.steps]
    (args.out / "update_rms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print("\nupdate RMS of the hidden matrices (median over matrices), u in W <- W (1 - lr wd) - lr u")
    print(HEADER + "\n" + "\n".join(summary_rows(records)))
    return 0


if __name__ == "__main__":
    from ..trainer.loop import exit_now

    exit_now(main())
