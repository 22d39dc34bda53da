"""End-to-end throughput: tokens/s of the tiny preset under 2-process FSDP2, per optimizer, and
the optimizer's share of the step.

    python -m launch.measure.throughput [--optimizers adamw mano muon muonmax momo-mano momo-muonmax] [--steps 30] [--nproc 2]

Runs ``launch.train`` with torchrun once per optimizer (same model, data and batch), skips the
first steps (warm-up), and reports medians from the metrics: tokens/s, step time, the time
inside ``optimizer.step()`` and its share, each relative to AdamW measured in the same command.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .trainer_speed import WARMUP, measure

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.measure.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_tiny.toml")
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "mano", "muon", "muonmax", "momo-mano", "momo-muonmax"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers:
            results[name] = measure(name, args.config, args.steps, args.nproc, Path(tmp) / name, args.overrides)
    print(f"{args.config} under FSDP2, {args.nproc} processes, {args.steps} steps (median of steps > {WARMUP})")
    print(f"{'optimizer':<12}{'tokens/s':>10}{'vs AdamW':>10}{'step ms':>9}{'opt ms':>8}{'opt share':>11}")
    base = results.get("adamw")
    for name, r in results.items():
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}x" if base else f"{'-':>10}"
        print(f"{name:<12}{r['tokens_per_s']:>10,.0f}{vs}{r['step_s'] * 1e3:>9.0f}{r['opt_s'] * 1e3:>8.0f}"
              f"{r['opt_s'] / r['step_s']:>10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
