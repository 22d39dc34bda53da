"""The token-scaling study: does an optimizer's gap change with more tokens?

    python -m launch.studies.scaling [--out runs/scaling] [--budgets 307200 1e6 3e6] [--seeds 0 1] [--jobs 2]

The convergence study (``launch.studies.compare``) measures one budget (307k tokens). This one trains
the same model (``configs/llama_study.toml``) at several token budgets, each with its own full
schedule (10 % warmup, cosine to 0.1x over that budget: a short run is not a truncated long
one), every optimizer at its best lr from the short study, ``--seeds`` each. At the largest
budget it also trains the neighbouring lrs of the half-decade grid (about lr / 3 and lr x 3)
with ``--sweep-seed``, and keeps stepping outward while the best lr sits on an edge of what was
tried, so a shifted optimum is seen. Runs go in priority order (the best-lr runs first), are
cached in ``--out/steps<N>/<optimizer>/lr<lr>/seed<s>``, and a re-run only trains what is
missing before redrawing the plots (``--summarize-only`` trains nothing). ``--records FILE``
counts the runs of a records file (the committed ``docs/scaling_runs.jsonl``) as done too, so a
fresh checkout trains only what the study still lacks. Every run is stamped with a fingerprint
of what it starts from (initial weights, first batch, validation windows); a cached run or record
whose fingerprint this checkout does not reproduce was made by other code or data, and is
retrained or refused rather than compared with fresh runs. ``--until HH:MM``
starts only runs expected to finish by then at the measured speed (shared machines);
``--extras`` are side questions run last at the smallest budget. The table, plots and per-run
JSONL come from ``launch.studies.scaling_report``; ``--from-jsonl`` redraws them without the runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from pathlib import Path

from .runner import OPTIMIZERS, final_record, train_run
from .scaling_report import read_jsonl, report, run_record
from .scaling_runs import SHORT_STUDY_BEST_LR, Run, scaling_dir
from ..trainer.metrics import METRICS_FILE, read_metrics

# The short study's optimizers, plus Mano v2 with its AdamW fallback (embeddings, head, norms:
# most of this small model's weights) at AdamW's best lr instead of Mano's: separates the two lrs.
STUDY_OPTIMIZERS = {**OPTIMIZERS, "mano-v2-fb3e-3": OPTIMIZERS["mano-v2"] + ["optim.adamw_lr=0.003"]}
# The short study's half-decade grid, extended one point each way for edge extensions.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
WARMUP_FRACTION = 0.1  # the paper's and the short study's 10 % warmup
EVALS_PER_RUN = 6


def budget_steps(tokens: float, tokens_per_step: int) -> int:
    """Steps that spend ``tokens``, rounded (307200 tokens at 2048 per step: the short study's 150)."""
    return max(1, round(tokens / tokens_per_step))


def schedule_overrides(steps: int) -> list[str]:
    """A full schedule for this budget: warmup and cosine span ``steps``, evaluations spread over it."""
    return [f"train.steps={steps}", f"optim.warmup_steps={max(1, round(WARMUP_FRACTION * steps))}",
            f"train.eval_every={max(1, math.ceil(steps / EVALS_PER_RUN))}",
            f"train.log_every={max(1, math.ceil(steps / 20))}", f"train.checkpoint_every={steps}"]


def run_sets(run: Run) -> list[str]:
    return STUDY_OPTIMIZERS[run.opt] + [f"optim.lr={run.lr}", f"train.seed={run.seed}"] + schedule_overrides(run.steps)


def grid_neighbours(lr: float, grid: tuple[float, ...] = LR_GRID) -> tuple[float | None, float | None]:
    """The grid points just below and above ``lr`` (None past the grid's ends)."""
    i = min(range(len(grid)), key=lambda k: abs(math.log(grid[k] / lr)))
    return (grid[i - 1] if i > 0 else None), (grid[i + 1] if i + 1 < len(grid) else None)


def scaling_plan(opts: list[str], steps: list[int], seeds: list[int], best_lr: dict[str, float],
                 sweep_seed: int, extras: list[str] = ()) -> list[Run]:
    """Every run of the study, most valuable first.

    Order: the first seed at the best lr on every budget (largest first: the trend, one seed),
    then the other seeds (cheapest budget first: the seed spread), then the lr neighbours at the
    largest budget (one optimizer's pair at a time, so a partial study still shows complete lr
    curves), then ``extras`` (side questions) at the smallest budget with every seed. A study cut
    short therefore loses its least valuable points."""
    by_size = sorted(set(steps), reverse=True)
    plan = [Run(o, best_lr[o], seeds[0], n) for n in by_size for o in opts]
    plan += [Run(o, best_lr[o], s, n) for s in seeds[1:] for n in reversed(by_size) for o in opts]
    for o in opts:
        plan += [Run(o, lr, sweep_seed, by_size[0]) for lr in grid_neighbours(best_lr[o]) if lr is not None]
    plan += [Run(o, best_lr[o], s, by_size[-1]) for s in seeds for o in extras]
    seen: set[Run] = set()
    return [r for r in plan if not (r in seen or seen.add(r))]


def edge_extensions(finals: dict[Run, float], opts: list[str], steps: int, sweep_seed: int) -> list[Run]:
    """One more lr per optimizer whose best (``sweep_seed``, ``steps``) lr is the lowest or highest
    it tried: the next grid point outward. Empty when every optimum is inside what was tried."""
    extra = []
    for o in opts:
        tried = {r.lr: v for r, v in finals.items() if r.opt == o and r.steps == steps and r.seed == sweep_seed}
        if len(tried) < 3:  # not a sweep yet (or an unfinished one): nothing to extend
            continue
        best = min(tried, key=lambda lr: tried[lr] if math.isfinite(tried[lr]) else math.inf)
        lo, hi = grid_neighbours(best)
        if best == min(tried) and lo is not None:
            extra.append(Run(o, lo, sweep_seed, steps))
        elif best == max(tried) and hi is not None:
            extra.append(Run(o, hi, sweep_seed, steps))
    return extra


def final_losses(out: Path, runs: list[Run]) -> dict[Run, float]:
    """Final validation loss of every finished run (nan for a diverged one)."""
    finals = {}
    for r in runs:
        rec = final_record(scaling_dir(out, r), r.steps)
        if rec is not None:
            finals[r] = rec["val_loss"] if rec["val_loss"] is not None else math.nan
    return finals


FINGERPRINT = "fingerprint"  # the file in a run folder


def study_fingerprint(config: str, seed: int) -> str:
    """What a run with ``seed`` starts from, as this checkout builds it: a hash of the initial
    weights, the first global batch and the validation windows (one process, about a second for
    the study's model). The optimizer's code is not in it; the model's, the init's and the data
    order's are, which is what silently differs between two checkouts' runs of one config."""
    import hashlib

    from ..config import load_config
    from ..data.loader import open_dataset
    from ..trainer.model import Llama, init_weights

    cfg = load_config(config, [f"train.seed={seed}"])
    model = Llama(cfg.model)
    init_weights(model, seed)
    data = open_dataset(cfg.data, cfg.model.vocab_size, cfg.train)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    for tensor in (data.sampler.batch(0, cfg.train.global_batch), data.val_windows):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_fingerprint(folder: Path) -> str | None:
    path = folder / FINGERPRINT
    return path.read_text().strip() if path.is_file() else None


def is_done(folder: Path, run: Run, fingerprints: dict[int, str] | None) -> bool:
    """Finished, and (given ``fingerprints``) from the same starting point this checkout builds."""
    return bool(final_record(folder, run.steps)) and (
        fingerprints is None or run_fingerprint(folder) == fingerprints[run.seed])


def finished_runs(out: Path, fingerprints: dict[int, str] | None = None) -> list[Run]:
    """Every run folder under ``out`` that reached its last step, whatever plan made it (and,
    given ``fingerprints``, whose fingerprint matches its seed's)."""
    runs = []
    for folder in sorted(out.glob("steps*/*/lr*/seed*")):
        run = Run(folder.parent.parent.name, float(folder.parent.name[2:]), int(folder.name[4:]),
                  int(folder.parent.parent.parent.name[5:]))
        if is_done(folder, run, fingerprints):
            runs.append(run)
    return runs


def recorded_runs(path: Path, tokens_per_step: int, fingerprints: dict[int, str]) -> dict[Run, dict]:
    """The runs a records file already holds, by run: they count as done (not retrained) and go
    into the report. A record made with another batch geometry or from another starting point
    (its fingerprint is not this checkout's for its seed) would mix two studies, so it is refused,
    as is a missing file (a typo must not silently retrain the whole study)."""

    if not path.is_file():
        raise SystemExit(f"--records {path}: no such file (omit --records to train every run)")
    runs = {}
    for rec in read_jsonl(path):
        if rec["tokens"] != rec["steps"] * tokens_per_step:
            raise SystemExit(f"--records {path}: {rec['opt']} seed {rec['seed']} ran {rec['tokens']} tokens in "
                             f"{rec['steps']} steps, not {tokens_per_step} per step as this config does; "
                             f"omit --records to train every run")
        if rec.get("fingerprint") != fingerprints[rec["seed"]]:
            raise SystemExit(f"--records {path}: {rec['opt']} lr {rec['lr']:g} seed {rec['seed']} ({rec['steps']} steps) "
                             f"started from fingerprint {rec.get('fingerprint')}, this checkout builds "
                             f"{fingerprints[rec['seed']]} for seed {rec['seed']}: the records were made by other "
                             f"model, init or data code; omit --records to train every run")
        runs[Run(rec["opt"], rec["lr"], rec["seed"], rec["steps"])] = rec
    return runs


def merged_records(out: Path, known: dict[Run, dict], fingerprints: dict[int, str] | None = None) -> list[dict]:
    """Every finished run's record: the runs under ``out`` (fresh) and the known ones they do not redo."""

    fresh = {r: run_record(scaling_dir(out, r), r.opt, r.lr, r.seed, r.steps)
             for r in finished_runs(out, fingerprints)}
    return list({**known, **fresh}.values())


def pick_next(queue: list[Run], seconds_left: float | None, secs_per_step: float | None) -> Run | None:
    """The first queued run expected to finish in the time left; any run without a deadline or
    before a speed was measured. Lets a study on shared cores end on time with its best points."""
    for run in queue:
        if seconds_left is None or secs_per_step is None or run.steps * secs_per_step <= seconds_left:
            return run
    return None


def recent_secs_per_step(out: Path, window_s: float = 900, last: int = 300, margin: float = 1.2) -> float | None:
    """Seconds per training step now: the median over the last ``last`` steps of every run under
    ``out`` written to in the last ``window_s`` (so under the machine's current load), plus a
    margin for evaluations and load swings (50 steps and 10 % once let a run start that the next
    minutes' load would have made too long). None before any run has logged a step."""
    secs = []
    now = time.time()
    for path in out.glob(f"steps*/*/lr*/seed*/{METRICS_FILE}"):
        if now - path.stat().st_mtime > window_s:
            continue
        recs = read_metrics(path)[-last:]
        secs += [r["tokens"] / r["step"] / r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    return margin * statistics.median(secs) if secs else None


def train_all(config: str, out: Path, runs: list[Run], jobs: int, deadline: float | None = None,
              fingerprints: dict[int, str] | None = None) -> list[Run]:
    """Train the unfinished ``runs`` in order, ``jobs`` at a time; returns those that did not
    finish (failed, or not started for the deadline).

    With a ``deadline`` (epoch seconds) a free slot takes the first run expected to finish by
    then at the measured speed, and stops when none is; what was not started is printed. With
    ``fingerprints`` (seed -> ``study_fingerprint``) each run folder is stamped before training,
    and a finished folder stamped otherwise (or not at all) is trained again."""
    queue = [r for r in runs if not is_done(scaling_dir(out, r), r, fingerprints)]
    for r in queue:
        folder = scaling_dir(out, r)
        if final_record(folder, r.steps):
            print(f"{folder}: finished from fingerprint {run_fingerprint(folder)}, not "
                  f"{fingerprints[r.seed]}: training it again", flush=True)
            (folder / METRICS_FILE).unlink()
    lock = threading.Lock()
    failed: list[Run] = []

    def worker():
        while True:
            with lock:
                left = None if deadline is None else deadline - time.time()
                run = pick_next(queue, left, recent_secs_per_step(out) if deadline else None)
                if run is None:
                    return
                queue.remove(run)
            if fingerprints is not None:
                scaling_dir(out, run).mkdir(parents=True, exist_ok=True)
                (scaling_dir(out, run) / FINGERPRINT).write_text(fingerprints[run.seed] + "\n")
            folder, secs, rc = train_run(config, scaling_dir(out, run), run_sets(run), run.steps)
            status = "done" if rc == 0 else f"FAILED (exit {rc}, see {folder}/train.log)"
            print(f"{time.strftime('%H:%M:%S')} {folder}: {status} in {secs:.0f} s", flush=True)
            if rc:
                with lock:
                    failed.append(run)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if queue:
        print(f"not started (would not finish by the deadline): {queue}", flush=True)
    return failed + queue


def _finals(out: Path, known: dict[Run, dict], fingerprints: dict[int, str]) -> dict[Run, float]:
    """Final validation loss of every finished run, fresh or known (nan: diverged)."""
    finals = {r: math.nan if rec["val_loss"] is None else rec["val_loss"] for r, rec in known.items()}
    return {**finals, **final_losses(out, finished_runs(out, fingerprints))}


def _today_at(hhmm: str) -> float:
    hours, minutes = map(int, hhmm.split(":"))
    now = time.localtime()
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0, 0, 0, -1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.studies.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_study.toml")
    ap.add_argument("--out", type=Path, default=Path("runs/scaling"))
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "mano-v2", "mano-both"],
                    choices=list(STUDY_OPTIMIZERS))
    ap.add_argument("--extras", nargs="*", default=["mano-v2-fb3e-3"], choices=list(STUDY_OPTIMIZERS),
                    help="run last, at the smallest budget only (in the table, not the plots)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[307200, 1e6, 3e6],
                    help="tokens per run (307200 = the short study's 150 steps)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--sweep-seed", type=int, default=0, help="the seed of the lr neighbours at the largest budget")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--docs", type=Path, default=None, help="also write the plots and the JSONL here")
    ap.add_argument("--until", default=None, metavar="HH:MM",
                    help="start only runs expected to finish by this local time today (shared machines)")
    ap.add_argument("--records", type=Path, default=None, metavar="JSONL",
                    help="runs in this records file (e.g. docs/scaling_runs.jsonl) count as done and are "
                         "reported with the fresh ones")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--from-jsonl", type=Path, default=None,
                    help="redraw the table and plots from a records file (e.g. docs/scaling_runs.jsonl), no runs needed")
    args = ap.parse_args(argv)

    from ..config import load_config

    cfg = load_config(args.config)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    steps = [budget_steps(b, tokens_per_step) for b in args.budgets]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_jsonl:  # a redraw: no runs, no checkout to compare them with

        print(report(args.out, [], args.optimizers, steps, args.seeds, tokens_per_step, args.docs,
                     read_jsonl(args.from_jsonl), args.extras))
        return 0
    from ..data.loader import cache_tokens

    cache_tokens(cfg.data, cfg.model.vocab_size)  # once, before parallel runs race to tokenize

    seeds = {*args.seeds, args.sweep_seed, *(int(f.name[4:]) for f in args.out.glob("steps*/*/lr*/seed*"))}
    if args.records and args.records.is_file():
        seeds |= {r["seed"] for r in read_jsonl(args.records)}
    fingerprints = {s: study_fingerprint(args.config, s) for s in seeds}  # every seed a run or record has
    known = recorded_runs(args.records, tokens_per_step, fingerprints) if args.records else {}
    if not args.summarize_only:
        plan = scaling_plan(args.optimizers, steps, args.seeds, SHORT_STUDY_BEST_LR, args.sweep_seed, args.extras)
        deadline = _today_at(args.until) if args.until else None
        t0 = time.perf_counter()
        unfinished = train_all(args.config, args.out, [r for r in plan if r not in known], args.jobs, deadline,
                               fingerprints)
        while extra := [r for r in edge_extensions(_finals(args.out, known, fingerprints),
                                                   args.optimizers, max(steps), args.sweep_seed)
                        if r not in unfinished]:
            print(f"best lr on an edge: adding {extra}", flush=True)
            unfinished += train_all(args.config, args.out, extra, args.jobs, deadline, fingerprints)
        print(f"wall time {(time.perf_counter() - t0) / 60:.1f} min; {len(unfinished)} runs did not finish",
              flush=True)

    print(report(args.out, [], args.optimizers, steps, args.seeds, tokens_per_step, args.docs,
                 merged_records(args.out, known, fingerprints), args.extras))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
