"""The convergence study: every optimizer on the same model, data and token budget.

    python -m launch.studies.compare [--out runs/compare] [--seeds 0 1] [--lrs 1e-3 3e-3 1e-2 3e-2] [--jobs 2]

Trains ``configs/llama_study.toml`` once per (optimizer, lr, seed) with ``launch.train`` in a
single process, ``--jobs`` runs at a time. For a given seed every optimizer starts from the
same weights and sees the same batches in the same order (``train.seed`` seeds both), with the
paper's schedule (warmup, cosine to 0.1x, wd 0.1, clip 1.0). Finished runs are skipped, so an
interrupted study continues where it stopped. Writes into ``--out``:

- ``val_loss.png``: validation loss vs tokens, each optimizer at its best lr, mean over seeds
  with the min-max band;
- ``lr_sweep.png``: final validation loss vs lr per optimizer (learning-rate robustness);
- ``summary.md``: the table (mean +- std over seeds, per lr) and the wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..trainer.metrics import METRICS_FILE, read_metrics
from .runner import OPTIMIZERS, final_record, run_dir, train_one

def _curves(out: Path, opt: str, lr: float, seeds: list[int]) -> list[list[dict]]:
    curves = []
    for seed in seeds:
        folder = run_dir(out, opt, lr, seed)
        if (folder / METRICS_FILE).is_file():
            curves.append([r for r in read_metrics(folder) if "val_loss" in r])
    return curves


def summarize(out: Path, opts: list[str], lrs: list[float], seeds: list[int], steps: int,
              wall: float | None = None) -> str:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals: dict[str, dict[float, list[float]]] = {}
    for opt in opts:
        for lr in lrs:
            vals = []
            for seed in seeds:
                rec = final_record(run_dir(out, opt, lr, seed), steps)
                vals.append(rec["val_loss"] if rec and math.isfinite(rec["val_loss"]) else float("nan"))
            finals.setdefault(opt, {})[lr] = vals

    def mean(v):
        ok = [x for x in v if math.isfinite(x)]
        return statistics.mean(ok) if len(ok) == len(v) else float("nan")

    best = {opt: min(lrs, key=lambda lr: (math.isnan(mean(finals[opt][lr])), mean(finals[opt][lr]))) for opt in opts}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt in opts:
        curves = [c for c in _curves(out, opt, best[opt], seeds) if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        tokens = [curves[0][i]["tokens"] / 1e6 for i in range(n)]
        per_point = [[c[i]["val_loss"] for c in curves] for i in range(n)]
        ax.plot(tokens, [statistics.mean(p) for p in per_point], marker="o", label=f"{opt} (lr {best[opt]:g})")
        ax.fill_between(tokens, [min(p) for p in per_point], [max(p) for p in per_point], alpha=0.2)
    ax.set(xlabel="tokens (millions)", ylabel="validation loss", title="validation loss, best lr per optimizer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for opt in opts:
        ax.plot(lrs, [mean(finals[opt][lr]) for lr in lrs], marker="o", label=opt)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final validation loss (step {steps})",
           title="learning-rate robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=120)
    plt.close(fig)

    def cell(v):
        ok = [x for x in v if math.isfinite(x)]
        if len(ok) < len(v):
            return "diverged" if not ok else f"{len(v) - len(ok)} diverged"
        return f"{statistics.mean(ok):.3f} ± {statistics.stdev(ok) if len(ok) > 1 else 0:.3f}"

    lines = ["| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---:|" * (len(lrs) + 1)]
    ranking = sorted(opts, key=lambda o: (math.isnan(mean(finals[o][best[o]])), mean(finals[o][best[o]])))
    for opt in ranking:
        lines.append(f"| {opt} | " + " | ".join(cell(finals[opt][lr]) for lr in lrs)
                     + f" | {mean(finals[opt][best[opt]]):.3f} |")
    table = "\n".join(lines)
    text = (f"Final validation loss after {steps} steps (mean ± std over seeds {seeds}); "
            f"best lr per optimizer in the last column, sorted.\n\n{table}\n")
    times = [float(f.read_text()) for opt in opts for lr in lrs for seed in seeds
             if (f := run_dir(out, opt, lr, seed) / "elapsed_s").is_file()]
    if times:
        text += (f"\nRun time: {len(times)} runs, {statistics.mean(times):.0f} s each on average, "
                 f"{sum(times) / 60:.1f} min in total (wall time about that / --jobs).\n")
    if wall is not None:
        text += f"This invocation's wall time: {wall / 60:.1f} min.\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.studies.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_study.toml")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    wall = None
    if not args.summarize_only:
        # Prepare the data once, before parallel runs race to tokenize it.
        from ..config import load_config
        from ..data.loader import cache_tokens

        cfg = load_config(args.config)
        cache_tokens(cfg.data, cfg.model.vocab_size)
        jobs = [(o, lr, s) for s in args.seeds for lr in args.lrs for o in args.optimizers]
        t0 = time.perf_counter()
        failed = []
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(train_one, args.config, args.out, o, lr, s, args.steps) for o, lr, s in jobs]
            for i, f in enumerate(futures, 1):
                folder, secs, rc = f.result()
                status = "done" if rc == 0 else f"FAILED (exit {rc}, see {folder}/train.log)"
                if rc:
                    failed.append(folder)
                print(f"[{i}/{len(jobs)}] {folder}: {status} in {secs:.0f} s", flush=True)
        wall = time.perf_counter() - t0
        if failed:
            print(f"{len(failed)} run(s) failed; the table marks them", file=sys.stderr)
    print(summarize(args.out, args.optimizers, args.lrs, args.seeds, args.steps, wall))
    print(f"plots: {args.out / 'val_loss.png'}, {args.out / 'lr_sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
