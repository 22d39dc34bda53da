"""What the memory switches cost in step time: the tiny preset under 2-process FSDP2 with
micro-batches, activation checkpointing and bf16, each against today's defaults (the whole
per-rank batch in one forward, no recompute, fp32) measured in the same command.

    python -m launch.measure.switch_cost [--config configs/llama_tiny.toml] [--steps 20] [--nproc 2]

Medians over the steps after the warm-up (``launch.measure.trainer_speed.measure``). On CPU, bf16 matmuls
are not faster than fp32; the bf16 row says what the cast costs here, not what a GPU gains.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .trainer_speed import WARMUP, measure

VARIANTS = {
    "today (whole batch, no recompute, fp32)": [],
    "micro-batch 2": ["train.micro_batch=2"],
    "activation checkpoint full": ["train.activation_checkpoint=full"],
    "micro-batch 2 + checkpoint full": ["train.micro_batch=2", "train.activation_checkpoint=full"],
    "micro-batch 2 + checkpoint + bf16": ["train.micro_batch=2", "train.activation_checkpoint=full",
                                          "train.mixed_precision=bf16"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.measure.switch_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_tiny.toml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, sets) in enumerate(VARIANTS.items()):
            results[label] = measure("mano", args.config, args.steps, args.nproc, Path(tmp) / str(i), sets)
    print(f"{args.config} under FSDP2, {args.nproc} processes, {args.steps} steps (median of steps > {WARMUP})")
    print(f"{'variant':<38}{'step ms':>9}{'vs today':>10}")
    base = next(iter(results.values()))["step_s"]
    for label, r in results.items():
        print(f"{label:<38}{r['step_s'] * 1e3:>9.0f}{r['step_s'] / base:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
