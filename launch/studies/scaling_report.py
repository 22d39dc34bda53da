"""The token-scaling study's records, table and plots, computed from per-run records only.

A record is one finished run: ``{"opt", "lr", "seed", "steps", "tokens", "val_loss", "curve",
"elapsed_s", "fingerprint"}`` with ``curve`` the [tokens, validation loss] pairs of its evaluations
and ``fingerprint`` what it started from (``launch.studies.scaling.study_fingerprint``). They are
written as JSONL next to the plots, so anyone can redraw them (``--from-jsonl``) without the runs.
Gaps between optimizers are paired by seed: a seed fixes the initial weights and the batch
order for every optimizer, so the per-seed difference removes that shared noise.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..trainer.metrics import read_metrics
from .scaling_runs import SHORT_STUDY_BEST_LR, scaling_dir

PLOTS = ("scaling_val_loss.png", "scaling_gap.png", "scaling_lr.png", "scaling_curves.png")
JSONL = "scaling_runs.jsonl"


def run_record(folder: Path, opt: str, lr: float, seed: int, steps: int) -> dict:
    evals = [r for r in read_metrics(folder) if "val_loss" in r]
    elapsed, fingerprint = folder / "elapsed_s", folder / "fingerprint"
    return {"opt": opt, "lr": lr, "seed": seed, "steps": steps, "tokens": evals[-1]["tokens"],
            "val_loss": _finite_or_none(evals[-1]["val_loss"]),
            "curve": [[r["tokens"], _finite_or_none(r["val_loss"])] for r in evals],
            "elapsed_s": float(elapsed.read_text()) if elapsed.is_file() else None,
            "fingerprint": fingerprint.read_text().strip() if fingerprint.is_file() else None}


def _finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None  # JSON has no NaN: a diverged run is null


def write_jsonl(records: list[dict], path: Path) -> None:
    key = lambda r: (r["opt"], r["steps"], r["lr"], r["seed"])  # noqa: E731
    path.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=key)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_of(records: list[dict], opt: str, lr: float, steps: int) -> dict[int, float]:
    """seed -> final validation loss (nan if diverged) of the finished runs of (opt, lr, steps)."""
    return {r["seed"]: (math.nan if r["val_loss"] is None else r["val_loss"]) for r in records
            if r["opt"] == opt and r["steps"] == steps and math.isclose(r["lr"], lr)}


def stats(values: list[float]) -> dict:
    """Mean, sample std and range over seeds; nan when any seed diverged or none finished."""
    if not values or not all(math.isfinite(v) for v in values):
        return {"n": len(values), "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan}
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "lo": min(values), "hi": max(values)}


def paired_gap(records: list[dict], a: str, lr_a: float, b: str, lr_b: float, steps: int) -> dict:
    """Stats of loss(a) - loss(b) over the seeds both finished (positive: a is behind b)."""
    la, lb = loss_of(records, a, lr_a, steps), loss_of(records, b, lr_b, steps)
    return stats([la[s] - lb[s] for s in sorted(set(la) & set(lb))])


def in_run_gap(records: list[dict], a: str, lr_a: float, b: str, lr_b: float, steps: int) -> list[tuple[int, dict]]:
    """Per evaluation inside the ``steps`` runs: (tokens, stats of loss(a) - loss(b) paired by seed)."""
    ca = {r["seed"]: r["curve"] for r in records if r["opt"] == a and r["steps"] == steps and math.isclose(r["lr"], lr_a)}
    cb = {r["seed"]: r["curve"] for r in records if r["opt"] == b and r["steps"] == steps and math.isclose(r["lr"], lr_b)}
    seeds = sorted(set(ca) & set(cb))
    if not seeds:
        return []
    n = min(min(len(ca[s]), len(cb[s])) for s in seeds)
    return [(ca[seeds[0]][i][0], stats([ca[s][i][1] - cb[s][i][1] if None not in (ca[s][i][1], cb[s][i][1])
                                        else math.nan for s in seeds])) for i in range(n)]


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return "not run"
    if math.isnan(s["mean"]):
        return "diverged"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})" if s["n"] > 1 else f"{s['mean']:.3f} (n=1)"


def _gap_cell(s: dict) -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "n/a"
    rng = f" [{s['lo']:+.3f}, {s['hi']:+.3f}]" if s["n"] > 1 else ""
    return f"{s['mean']:+.3f}{rng} (n={s['n']})"


def gap_pairs(opts: list[str], mano: str = "mano-v2") -> list[tuple[str, str]]:
    """(Mano variant, rival) pairs whose paired gaps are reported: every Mano variant in the study
    against every non-Mano optimizer; with ``mano`` alone among the variants, ``mano`` against the rest."""
    variants = [o for o in opts if o.startswith("mano")] if mano in opts else []
    return [(m, o) for m in variants for o in opts if o not in variants]


def tables(records: list[dict], opts: list[str], steps: list[int], best_lr: dict[str, float],
           mano: str = "mano-v2", extras: list[str] = ()) -> str:
    """Markdown: final loss per budget at each optimizer's best short-study lr, the Mano variants'
    paired gaps, the lr sweep at the largest budget (every lr and seed that finished), and the
    extras' runs with their paired gap to ``mano``."""
    per_step = records[0]["tokens"] / records[0]["steps"] if records else None  # one batch geometry per study
    label = {n: f"{n * per_step / 1e6:.2f}M" if per_step else f"{n} steps" for n in steps}
    pairs = gap_pairs(opts, mano)
    head = ["| tokens (steps) | " + " | ".join(f"{o} (lr {best_lr[o]:g})" for o in opts)
            + "".join(f" | {m} − {o}" for m, o in pairs) + " |",
            "|---|" + "---:|" * (len(opts) + len(pairs))]
    rows = []
    for n in sorted(steps):
        cells = [_cell(stats(list(loss_of(records, o, best_lr[o], n).values()))) for o in opts]
        cells += [_gap_cell(paired_gap(records, m, best_lr[m], o, best_lr[o], n)) for m, o in pairs]
        rows.append(f"| {label[n]} ({n}) | " + " | ".join(cells) + " |")
    big = max(steps)
    sweep = [f"| optimizer at {label[big]} | peak lr | final loss per seed | mean |", "|---|---:|---|---:|"]
    for o in opts:
        for lr in sorted({r["lr"] for r in records if r["steps"] == big and r["opt"] == o}):
            per_seed = loss_of(records, o, lr, big)
            seeds = ", ".join(f"s{s} {v:.3f}" if math.isfinite(v) else f"s{s} diverged"
                              for s, v in sorted(per_seed.items()))
            mean = stats(list(per_seed.values()))["mean"]
            mark = " (short-study best)" if math.isclose(lr, best_lr[o]) else ""
            sweep.append(f"| {o} | {lr:g}{mark} | {seeds} | {mean:.3f} |" if math.isfinite(mean)
                         else f"| {o} | {lr:g}{mark} | {seeds} | diverged |")
    text = "\n".join(head + rows) + "\n\n" + "\n".join(sweep) + "\n"
    for m, o in pairs:
        gaps = in_run_gap(records, m, best_lr[m], o, best_lr[o], big)
        if gaps:
            text += (f"\n{m} − {o} during the {label[big]} runs (paired, at each evaluation): "
                     + ", ".join(f"{t / 1e6:.2f}M {g['mean']:+.3f}" for t, g in gaps) + "\n")
    extra = [f"| extra | tokens (steps) | final loss | paired gap to {mano} |", "|---|---|---:|---:|"]
    for o in extras:
        for n in sorted({r["steps"] for r in records if r["opt"] == o}):
            extra.append(f"| {o} (lr {best_lr[o]:g}) | {label.get(n, n)} ({n}) | "
                         f"{_cell(stats(list(loss_of(records, o, best_lr[o], n).values())))} | "
                         f"{_gap_cell(paired_gap(records, o, best_lr[o], mano, best_lr[mano], n))} |")
    return text + ("\n" + "\n".join(extra) + "\n" if len(extra) > 2 else "")


def plot(records: list[dict], opts: list[str], steps: list[int], best_lr: dict[str, float], out: Path,
         mano: str = "mano-v2") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tokens_of(n):  # in millions
        return next((r["tokens"] / 1e6 for r in records if r["steps"] == n), math.nan)

    def finish(fig, ax, path, which="major"):
        ax.grid(alpha=0.3, which=which)
        if ax.get_legend_handles_labels()[0]:  # e.g. no gap lines without Mano in the study
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def budget_ticks(ax):
        ticks = [t for t in map(tokens_of, ns) if math.isfinite(t)]
        ax.set_xticks(ticks, [f"{t:.2f}M" for t in ticks])
        ax.minorticks_off()

    color = {o: f"C{i}" for i, o in enumerate(opts)}  # the same colour for an optimizer in every plot

    def line(ax, xs, ss, label, c, style="-"):
        pts = [(x, s) for x, s in zip(xs, ss) if s["n"] and math.isfinite(s["mean"])]
        if not pts:
            return
        x = [p[0] for p in pts]
        ax.plot(x, [p[1]["mean"] for p in pts], marker="o", label=label, color=c, linestyle=style)
        ax.fill_between(x, [p[1]["lo"] for p in pts], [p[1]["hi"] for p in pts], alpha=0.2, color=c)

    ns = sorted(steps)
    paths = [out / name for name in PLOTS]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in opts:
        line(ax, [tokens_of(n) for n in ns], [stats(list(loss_of(records, o, best_lr[o], n).values())) for n in ns],
             f"{o} (lr {best_lr[o]:g})", color[o])
    ax.set(xscale="log", xlabel="tokens (own warmup + cosine schedule per budget)", ylabel="final validation loss",
           title="token scaling: final validation loss (mean, min-max over seeds)")
    budget_ticks(ax)
    finish(fig, ax, paths[0], which="both")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pairs = gap_pairs(opts, mano)
    variants = sorted({m for m, _ in pairs})
    for m, o in pairs:  # colour: the rival; line style: the Mano variant
        line(ax, [tokens_of(n) for n in ns], [paired_gap(records, m, best_lr[m], o, best_lr[o], n) for n in ns],
             f"{m} − {o}", color[o], ("-", "--", ":")[variants.index(m) % 3])
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="tokens", ylabel="Δ final validation loss (nat; > 0: Mano behind)",
           title="Mano's gap, paired by seed (mean, min-max)")
    budget_ticks(ax)
    finish(fig, ax, paths[1], which="both")

    big = max(steps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in opts:  # one line per optimizer over the lrs one seed (the lowest) tried; other seeds as dots
        runs = sorted((r["lr"], r["seed"], r["val_loss"]) for r in records
                      if r["opt"] == o and r["steps"] == big and r["val_loss"] is not None)
        if not runs:
            continue
        seed = min(s for _, s, _ in runs)
        ax.plot([lr for lr, s, _ in runs if s == seed], [v for _, s, v in runs if s == seed],
                            marker="o", label=f"{o} (seed {seed})", color=color[o])
        others = [(lr, v) for lr, s, v in runs if s != seed]
        if others:
            ax.scatter(*zip(*others), marker="x", color=color[o], label=f"{o}, other seeds")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final validation loss ({big} steps)",
           title=f"lr sensitivity at {tokens_of(big):.2f}M tokens")
    finish(fig, ax, paths[2], which="both")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in opts:  # inside the largest budget's runs: is anyone behind early and ahead in the decay?
        curves = [r["curve"] for r in records if r["opt"] == o and r["steps"] == big and math.isclose(r["lr"], best_lr[o])]
        n = min((len(c) for c in curves), default=0)
        if not n:
            continue
        x = [curves[0][i][0] / 1e6 for i in range(n)]
        ys = [[c[i][1] for c in curves if c[i][1] is not None] for i in range(n)]
        ax.plot(x, [statistics.mean(y) if y else math.nan for y in ys], marker="o", color=color[o],
                label=f"{o} (lr {best_lr[o]:g}, {len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.fill_between(x, [min(y) if y else math.nan for y in ys], [max(y) if y else math.nan for y in ys],
                        alpha=0.2, color=color[o])
    ax.set(xlabel="tokens (millions)", ylabel="validation loss",
           title=f"validation loss during the {tokens_of(big):.2f}M-token runs (warmup + cosine)")
    finish(fig, ax, paths[3])
    return paths


def report(out: Path, runs, opts: list[str], steps: list[int], seeds: list[int], tokens_per_step: int,
           docs: Path | None = None, records: list[dict] | None = None, extras: list[str] = ()) -> str:
    """Records (from ``runs`` under ``out`` unless given), JSONL, plots and ``summary.md`` into
    ``out`` (and the plots and JSONL into ``docs`` too); returns the summary text."""
    if records is None:
        records = [run_record(scaling_dir(out, r), r.opt, r.lr, r.seed, r.steps) for r in runs]
    for folder in [out] + ([docs] if docs else []):
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(records, folder / JSONL)
        plot(records, opts, steps, SHORT_STUDY_BEST_LR, folder)
    times = [r["elapsed_s"] for r in records if r["elapsed_s"]]
    text = (f"Token scaling: {len(records)} finished runs, budgets {sorted(steps)} steps x {tokens_per_step} tokens, "
            f"seeds {seeds}; final validation loss at each optimizer's best short-study lr, "
            f"mean ± std over the seeds that finished (n); gaps paired by seed, [min, max].\n\n"
            + tables(records, opts, steps, SHORT_STUDY_BEST_LR, extras=extras))
    if times:
        text += f"\nRun time: {len(times)} runs, {sum(times) / 60:.1f} min of single-thread processes in total.\n"
    (out / "summary.md").write_text(text)
    return text
