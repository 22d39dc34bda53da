"""Train a LLaMA-style model with Mano under FSDP2: ``torchrun --nproc-per-node N -m launch.train``.

    torchrun --nproc-per-node 2 -m launch.train --config configs/llama_tiny.toml [--set optim.lr=1e-3] [--resume auto]
    torchrun --nproc-per-node 2 -m launch.train --engine deepspeed --ds-config configs/ds_zero2.json

Device-agnostic: CUDA + NCCL when GPUs are visible, else CPU + gloo. Each step prints one line
(step, loss, lr, tokens/s, MFU on CUDA, optimizer step time, ETA); validation perplexity every ``eval_every``
steps; metrics go to ``<out_dir>/metrics.jsonl``; checkpoints to ``<out_dir>/checkpoints``
every ``checkpoint_every`` steps (resume with ``--resume auto``); a loss plot at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError, accumulation_steps, load_config
from .data import DataError, open_dataset
from .engines import DeepSpeedEngine, FSDPEngine, deepspeed_config, describe_optimizer
from .metrics import MetricsWriter, eta_seconds, flops_per_token, format_duration, peak_bf16_flops, peak_rss_gib
from .model import build_model, count_parameters
from .parallel import all_reduce_sum, build_mesh, data_parallel_rank, setup_distributed


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
    return peak_rss_gib()


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


class Geometry:
    """How one optimizer step is cut up: data-parallel ranks, micro-batches and accumulation,
    plus the DeepSpeed JSON when that engine runs. Built from numbers every rank shares, so a
    bad combination raises the same ConfigError on every rank before any collective."""

    def __init__(self, cfg, world: int):
        tp = cfg.parallel.tp
        if world % tp:
            raise ConfigError(f"parallel.tp {tp} does not divide the {world} ranks")
        self.dp = world // tp
        if cfg.train.global_batch % self.dp:
            raise ConfigError(f"train.global_batch {cfg.train.global_batch} is not divisible by the "
                              f"{self.dp} data-parallel ranks")
        self.per_rank = cfg.train.global_batch // self.dp
        self.ds_config, self.notes = None, []
        if cfg.parallel.engine == "deepspeed":
            self.ds_config, self.notes = deepspeed_config(cfg, self.dp)
            self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
            self.accumulation = self.ds_config["gradient_accumulation_steps"]
        else:
            self.micro, self.accumulation = accumulation_steps(cfg, self.dp)


class Trainer:
    """The training loop, top to bottom: ``fit`` runs ``train_step`` (micro-batches, one optimizer
    step), ``evaluate``, ``log`` and ``save`` per step. ``callbacks`` are called as
    ``callback(trainer, step)`` after each step is logged and saved: the tests inject faults
    this way (``tests/train_with_faults.py``); a real run passes none."""

    def __init__(self, cfg, args, rank: int, world: int, device, geometry: Geometry, data, callbacks=()):
        self.cfg, self.rank, self.world, self.device, self.geo = cfg, rank, world, device, geometry
        self.callbacks = list(callbacks)
        t, m = cfg.train, cfg.model
        self.out = Path(t.out_dir)
        self.log = print if rank == 0 else (lambda *a, **k: None)
        self.sampler, self.val_windows = data.sampler, data.val_windows

        self.mesh = build_mesh(device, world, cfg.parallel.tp) if dist.is_initialized() else None
        self.dp_rank, self.dp_size = data_parallel_rank(self.mesh)
        fsdp = cfg.parallel.engine == "fsdp2"
        model = build_model(cfg, self.mesh, device, shard=fsdp)
        self.n_params = count_parameters(model)
        if fsdp:
            self.engine = FSDPEngine(model, cfg, self.out)
            optimizer = cfg.optim.name
        else:
            self.engine = DeepSpeedEngine(model, cfg, self.out, geometry.ds_config)
            optimizer = describe_optimizer(geometry.ds_config)
        # bf16 without FSDP2 to hold fp32 masters (one process): autocast, the same compute dtype.
        bf16_autocast = t.autocast_bf16 or (fsdp and self.mesh is None and t.mixed_precision == "bf16")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast)

        self.start, self.seen = 0, 0
        if args.resume != "none":
            info = self.engine.load(args.resume)
            if info is not None:
                self.start, self.seen, path = info
                self.log(f"resumed from {path} at step {self.start}")
        for note in geometry.notes:
            self.log(f"note: {cfg.parallel.ds_config}: {note}")
        self.log(f"LLaMA {self.n_params / 1e6:.2f}M params, {world} rank(s) (dp {self.dp_size}, tp {cfg.parallel.tp}) "
                 f"on {device.type}, optimizer {optimizer}, {t.steps} steps x {t.global_batch} x {cfg.data.seq_len} "
                 f"tokens (micro-batch {geometry.micro} x {geometry.accumulation} accumulation per rank), "
                 f"activation checkpoint {t.activation_checkpoint}, mixed precision {t.mixed_precision}, "
                 f"compile {t.compile}, {data.description}")
        self.flops_per_token = flops_per_token(m, self.n_params, cfg.data.seq_len)
        self.peak_flops = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over this rank's share of the global batch, in micro-batches.
        The batch is the same windows as without accumulation; only the forward is cut up.
        Returns (mean loss over all ranks, gradient norm, optimizer seconds)."""
        g = self.geo
        batch = self.sampler.batch(self.seen + self.dp_rank * g.per_rank, g.per_rank)
        self.seen += self.cfg.train.global_batch
        total = torch.zeros((), device=self.device)
        for i in range(g.accumulation):
            micro = batch[i * g.micro:(i + 1) * g.micro].to(self.device)
            with self.autocast:
                logits = self.engine.forward(micro[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten())
            self.engine.micro_backward(loss, g.accumulation, last=i == g.accumulation - 1)
            total += loss.detach()
        step_loss = total / g.accumulation
        grad_norm, t_opt = self.engine.step(step_loss)
        return all_reduce_sum(step_loss.clone()).item() / self.world, grad_norm, t_opt

    def record(self, step: int, loss: float, lr: float, grad_norm: float, t_opt: float, elapsed: float,
               timing: list[float]) -> dict:
        t, seq = self.cfg.train, self.cfg.data.seq_len
        tokens_per_s = t.global_batch * seq / elapsed
        timed = timing[1:] or timing  # the first step compiles and warms up
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.seen * seq,
                  "tokens_per_s": tokens_per_s, "opt_step_s": t_opt,
                  "eta_s": eta_seconds(len(timed), t.steps - step - 1, sum(timed))}
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.world * self.peak_flops)
        momo = getattr(self.engine.optimizer, "last_momo", None)
        if momo:  # Momo's model-based step; the step taken is min(lr, this)
            record["momo_polyak_step"] = momo["polyak_step"] if math.isfinite(momo["polyak_step"]) else None
        return record

    def fit(self) -> None:
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a new metrics file; a resumed one appends (re-logged steps win).
        metrics = MetricsWriter(self.out, append=bool(self.start), tensorboard=t.tensorboard) if self.rank == 0 else None
        timing: list[float] = []
        self.engine.train_mode()
        for step in range(self.start, t.steps):
            t0 = time.perf_counter()
            lr = self.engine.lr
            loss, grad_norm, t_opt = self.train_step()
            timing.append(time.perf_counter() - t0)
            record = self.record(step, loss, lr, grad_norm, t_opt, timing[-1], timing)
            if (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
                self.engine.eval_mode()
                record["val_loss"] = evaluate(self.engine.forward, self.val_windows, self.dp_rank, self.dp_size, self.device)
                record["val_ppl"] = math.exp(record["val_loss"])
                self.engine.train_mode()
            if (step + 1) % t.log_every == 0 or "val_loss" in record or step == self.start:
                self.log(format_line(record, t.steps), flush=True)
            if metrics:
                metrics.write(record)
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                self.engine.save(step + 1, self.seen)
            for callback in self.callbacks:
                callback(self, step + 1)
        self.engine.wait()
        if metrics:
            metrics.close()

    def finish(self) -> None:
        peaks = [peak_memory_gib(self.device)]
        if dist.is_initialized():
            peaks = [None] * self.world
            dist.all_gather_object(peaks, peak_memory_gib(self.device))
        self.log("peak memory per rank, GiB: " + ", ".join(f"{p:.2f}" for p in peaks))
        if self.rank == 0:
            from .plot import plot_runs

            png = plot_runs([self.out / "metrics.jsonl"], self.out / "loss.png")
            final = [json.loads(line) for line in open(self.out / "metrics.jsonl")][-1]
            if "val_ppl" in final:
                print(f"final validation perplexity {final['val_ppl']:.2f} (loss {final['val_loss']:.4f})")
            print(f"loss plot: {png}")


def format_line(record: dict, steps: int) -> str:
    val = f"  val loss {record['val_loss']:.3f} ppl {record['val_ppl']:.1f}" if "val_loss" in record else ""
    mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
    return (f"step {record['step']:5d}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}  opt {record['opt_step_s'] * 1e3:.0f} ms  "
            f"eta {format_duration(record['eta_s'])}{val}")


def _leave(code: int) -> int:
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def main(argv=None, callbacks=()) -> int:
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
    rank, world, device = setup_distributed()
    try:
        geometry = Geometry(cfg, world)
    except ConfigError as e:  # every rank sees the same numbers: all exit before any collective
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _leave(2)

    try:  # a prepared folder is mapped by every rank; a small source is tokenized by rank 0 first
        data = open_dataset(cfg.data, cfg.model.vocab_size, cfg.train, rank)
    except DataError as e:  # raised on every rank alike
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _leave(2)

    trainer = Trainer(cfg, args, rank, world, device, geometry, data, callbacks)
    trainer.fit()
    trainer.finish()
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down gloo while a peer still works aborts
    return _leave(0)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: with gloo, a rank occasionally aborts (SIGABRT,
    "terminate called without an active exception") while destructing C++ threads *after*
    ``destroy_process_group`` (shared/notes/platform.md: about 1 run in 12; ``os._exit`` avoided
    it in 25/25). Everything the run writes is closed and flushed before ``main`` returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
