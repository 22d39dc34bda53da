"""Train a LLaMA-style model with Mano under FSDP2: ``torchrun --nproc-per-node N -m launch.train``.

    torchrun --nproc-per-node 2 -m launch.train --config configs/llama_tiny.toml [--set optim.lr=1e-3] [--resume auto]
    torchrun --nproc-per-node 2 -m launch.train --engine deepspeed --ds-config configs/ds_zero2.json

Device-agnostic: CUDA + NCCL when GPUs are visible, else CPU + gloo. Each step prints one line
(step, loss, lr, tokens/s, optimizer step time); validation perplexity every ``eval_every``
steps; metrics go to ``<out_dir>/metrics.jsonl``; checkpoints to ``<out_dir>/checkpoints``
every ``checkpoint_every`` steps (resume with ``--resume auto``); a loss plot at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError, load_config
from .data import DataError, open_dataset
from .engines import DeepSpeedEngine, FSDPEngine
from .model import Llama, count_parameters
from .parallel import all_reduce_sum, build_mesh, data_parallel_rank, setup_distributed, shard_model


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="launch.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_tiny.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a step-N path")
    ap.add_argument("--out-dir", default=None, help="overrides train.out_dir")
    ap.add_argument("--engine", choices=("fsdp2", "deepspeed"), default=None, help="= --set parallel.engine=...")
    ap.add_argument("--ds-config", default=None, help="DeepSpeed JSON (= --set parallel.ds_config=...)")
    ap.add_argument("--data", default=None, metavar="FILES",
                    help="a few .txt/.jsonl(.gz)/.parquet files or globs, comma-separated (= --set data.source=...)")
    ap.add_argument("--data-dir", default=None, metavar="DIR",
                    help="a folder made by python -m launch.prepare (= --set data.prepared=...)")
    ap.add_argument("--check", action="store_true", help="validate the arguments and config, then exit without training")
    args = ap.parse_args(argv)
    if args.data:
        args.overrides.append(f"data.source={args.data}")
    if args.data_dir:
        args.overrides.append(f"data.prepared={args.data_dir}")
    if args.engine:
        args.overrides.append(f"parallel.engine={args.engine}")
    if args.ds_config:
        args.overrides.append(f"parallel.ds_config={args.ds_config}")
    return args


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def evaluate(model, val_windows, rank, world, device) -> float:
    """Mean token loss over the validation windows, split across ranks."""
    mine = val_windows[rank::world].to(device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if len(mine):
        logits = model(mine[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), mine[:, 1:].flatten(), reduction="sum")
        total += torch.tensor([loss.item(), mine[:, 1:].numel()], dtype=torch.float64, device=device)
    elif dist.is_initialized():
        model(val_windows[:1, :-1].to(device))  # FSDP2 collectives must run on every rank
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # before any process group: every rank exits cleanly
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:  # tests/test_docs_commands.py runs every documented command so
        print(f"{args.config}: ok")
        return 0
    if args.out_dir:
        cfg.train.out_dir = args.out_dir
    t, m = cfg.train, cfg.model
    rank, world, device = setup_distributed()
    tp = cfg.parallel.tp
    msg = None
    if world % tp:
        msg = f"parallel.tp {tp} does not divide the {world} ranks"
    elif t.global_batch % (world // tp):
        msg = f"train.global_batch {t.global_batch} is not divisible by the {world // tp} data-parallel ranks"
    if msg:  # every rank sees the same numbers: all exit before any collective
        if rank == 0:
            print(f"error: {msg}", file=sys.stderr)
        dist.destroy_process_group() if dist.is_initialized() else None
        return 2
    out = Path(t.out_dir)
    log = print if rank == 0 else (lambda *a, **k: None)

    try:  # a prepared folder is mapped by every rank; a small source is tokenized by rank 0 first
        data = open_dataset(cfg.data, m.vocab_size, t, rank)
    except DataError as e:  # raised on every rank alike
        log(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group() if dist.is_initialized() else None
        return 2
    sampler, val_windows = data.sampler, data.val_windows

    torch.manual_seed(t.seed)  # same init on every rank, before sharding
    model = Llama(m).to(device)
    n_params = count_parameters(model)
    mesh = build_mesh(device, world, tp) if dist.is_initialized() else None
    dp_rank, dp_size = data_parallel_rank(mesh)
    if mesh is not None and cfg.parallel.engine == "fsdp2":
        shard_model(model, mesh)
    if cfg.parallel.engine == "deepspeed":
        engine = DeepSpeedEngine(model, cfg, out, dp_size)
    else:
        engine = FSDPEngine(model, cfg, out)

    start, seen = 0, 0
    if args.resume != "none":
        info = engine.load(args.resume)
        if info is not None:
            start, seen, path = info
            log(f"resumed from {path} at step {start}")
    log(f"LLaMA {n_params / 1e6:.2f}M params, {world} rank(s) (dp {dp_size}, tp {tp}) on {device.type}, optimizer {cfg.optim.name}, "
        f"{t.steps} steps x {t.global_batch} x {cfg.data.seq_len} tokens, {data.description}")

    out.mkdir(parents=True, exist_ok=True)
    # A fresh run starts a new metrics file; a resumed one appends (re-logged steps win).
    metrics = open(out / "metrics.jsonl", "a" if start else "w") if rank == 0 else None
    per_rank = t.global_batch // dp_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.autocast_bf16)
    engine.train_mode()
    crash_at = int(os.environ.get("MANO_TRAIN_CRASH_AT_STEP", 0)) if start == 0 else 0
    crash_rank = int(os.environ["MANO_TRAIN_CRASH_RANK"]) if "MANO_TRAIN_CRASH_RANK" in os.environ else None
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        batch = sampler.batch(seen + dp_rank * per_rank, per_rank).to(device)
        seen += t.global_batch
        with autocast:
            logits = engine.forward(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        lr = engine.lr
        grad_norm, t_opt = engine.backward_step(loss)
        loss_avg = all_reduce_sum(loss.detach().clone()).item() / world
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm,
                  "tokens": seen * cfg.data.seq_len, "tokens_per_s": t.global_batch * cfg.data.seq_len / elapsed,
                  "opt_step_s": t_opt}
        momo = getattr(engine.optimizer, "last_momo", None)
        if momo:  # Momo's model-based step; the step taken is min(lr, this)
            record["momo_polyak_step"] = momo["polyak_step"] if math.isfinite(momo["polyak_step"]) else None
        if (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
            engine.eval_mode()
            record["val_loss"] = evaluate(engine.forward, val_windows, dp_rank, dp_size, device)
            record["val_ppl"] = math.exp(record["val_loss"])
            engine.train_mode()
        if (step + 1) % t.log_every == 0 or "val_loss" in record or step == start:
            val = f"  val loss {record['val_loss']:.3f} ppl {record['val_ppl']:.1f}" if "val_loss" in record else ""
            log(f"step {step + 1:5d}/{t.steps}  loss {loss_avg:.4f}  lr {lr:.2e}  "
                f"{record['tokens_per_s']:,.0f} tok/s  opt {t_opt * 1e3:.0f} ms{val}", flush=True)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            engine.save(step + 1, seen)
        if crash_at == step + 1 and crash_rank in (None, rank):  # fault injection (tests): a lost node
            os.kill(os.getpid(), signal.SIGKILL)
    engine.wait()
    peaks = [peak_memory_gib(device)]
    if dist.is_initialized():
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_memory_gib(device))
    log("peak memory per rank, GiB: " + ", ".join(f"{p:.2f}" for p in peaks))
    if rank == 0:
        metrics.close()
        from .plot import plot_runs

        png = plot_runs([out / "metrics.jsonl"], out / "loss.png")
        final = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
        if "val_ppl" in final:
            print(f"final validation perplexity {final['val_ppl']:.2f} (loss {final['val_loss']:.4f})")
        print(f"loss plot: {png}")
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down gloo while a peer still works aborts
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
