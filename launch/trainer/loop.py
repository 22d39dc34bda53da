"""Train a LLaMA-style model with Mano under FSDP2: ``torchrun --nproc-per-node N -m launch.train``.

    torchrun --nproc-per-node 2 -m launch.train --config configs/llama_tiny.toml [--set optim.lr=1e-3] [--resume auto]
    torchrun --nproc-per-node 2 -m launch.train --engine deepspeed --ds-config configs/ds_zero2.json

Device-agnostic: CUDA + NCCL when GPUs are visible, else CPU + gloo. Every ``log_every`` steps
one line (step, loss, lr, tokens/s, MFU and memory on CUDA, optimizer step time, ETA); validation
perplexity every ``eval_every`` steps; every step's metrics go to ``<out_dir>/metrics.jsonl``;
checkpoints to ``<out_dir>/checkpoints`` every ``checkpoint_every`` steps (resume with
``--resume auto``); a loss plot at the end. SIGTERM or SIGUSR1 (a scheduler's preemption) stops
the run at the next step boundary with a complete checkpoint and exit code 75
(``launch/trainer/preemption.py``). ``out_dir`` belongs to one run at a time: it is locked, stamped with
the run's identity, and ``--resume none`` refuses one that holds checkpoints unless
``--overwrite`` (``launch/trainer/run_identity.py``). Device values (loss, gradient norm, the optimizer's
CUDA-event time) are read on the host only on the steps that log, evaluate or save, all steps
since the last read at once: a step in between never waits for the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError, accumulation_steps, load_config
from ..data.loader import DataError, open_dataset
from .engines import DeepSpeedEngine, FSDPEngine, deepspeed_config, describe_optimizer
from .metrics import (MetricsWriter, compute_dtype, cuda_memory_gib, eta_seconds, flops_per_token, format_duration,
                      peak_flops, peak_rss_gib, read_metrics)
from .model import build_model, count_parameters
from .parallel import all_reduce_sum, build_mesh, data_parallel_rank, setup_distributed
from .preemption import PREEMPTED_EXIT_CODE, Preemption, clear_marker, signal_name, write_marker
from .run_identity import RunFolder, RunFolderError, claim


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="launch.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_tiny.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a step-N path")
    ap.add_argument("--out-dir", default=None, help="overrides train.out_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="with --resume none: delete the checkpoints out_dir holds (refused without it)")
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


def peak_memory(device: torch.device) -> tuple[float, ...]:
    """On CUDA (allocated, reserved, device used) peak GiB (see ``cuda_memory_gib``), on CPU the
    process's peak resident set."""
    if device.type == "cuda":
        m = cuda_memory_gib(device)
        return m["mem_allocated_gib"], m["mem_reserved_gib"], m["mem_device_used_gib"]
    return (peak_rss_gib(),)


def pinned(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA the host batch in pinned memory, so that its copies to the GPU can be
    ``non_blocking`` (the host queues them and goes on); elsewhere the batch itself."""
    return batch.pin_memory() if device.type == "cuda" else batch


@torch.no_grad()
def evaluate(model, val_windows, rank, world, device) -> float:
    """Mean token loss over the validation windows, split across ranks: summed on the device,
    read on the host once."""
    mine = pinned(val_windows[rank::world], device).to(device, non_blocking=True)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if len(mine):
        logits = model(mine[:, :-1])
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), mine[:, 1:].flatten(), reduction="sum")
        total[1] += mine[:, 1:].numel()
    elif dist.is_initialized():
        model(val_windows[:1, :-1].to(device))  # FSDP2 collectives must run on every rank
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def half_precision_matmuls(cfg, ds_config: dict | None) -> bool:
    """Whether the matmuls run in bf16/fp16 (the MFU peak's dtype): under DeepSpeed its JSON
    decides, under FSDP2 ``train.mixed_precision`` or ``train.autocast_bf16``."""
    if ds_config is not None:
        return any(ds_config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    return cfg.train.mixed_precision == "bf16" or cfg.train.autocast_bf16


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
    step), ``evaluate``, ``log`` and ``save`` per step, then asks every rank whether a signal
    came (``preemption.agreed()``) and stops there if one did. ``callbacks`` are called as
    ``callback(trainer, step)`` after each step is logged and saved: the tests inject faults
    this way (``tests/train_with_faults.py``); a real run passes none. ``run`` is the claimed
    output folder (its identity goes into every checkpoint)."""

    def __init__(self, cfg, args, rank: int, world: int, device, geometry: Geometry, data, callbacks=(), *,
                 run: RunFolder, preemption: Preemption):
        self.cfg, self.rank, self.world, self.device, self.geo = cfg, rank, world, device, geometry
        self.callbacks = list(callbacks)
        self.run, self.preemption = run, preemption
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
        for note in run.notes:
            self.log(f"note: {note}")
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
        self.peak_flops = None
        if device.type == "cuda":
            dtype = compute_dtype(half_precision_matmuls(cfg, geometry.ds_config))
            self.peak_flops = peak_flops(torch.cuda.get_device_name(device), dtype)
        # Steps trained but not yet read on the host: their (loss summed over ranks, gradient
        # norm, optimizer stopwatch) and their records, whose values ``read_pending`` supplies.
        self.pending: list[tuple[torch.Tensor, object, object]] = []
        self.unread: list[dict] = []
        self.metrics, self.timing = None, []
        # Checkpoints saved but not yet stamped with the run's identity (an async one in flight),
        # and the newest saved (step, folder).
        self.in_flight: list[tuple[int, Path]] = []
        self.saved: tuple[int, Path] | None = None
        self.stopped: tuple[int, int] | None = None  # (step, signal) when a signal stopped the run

    def train_step(self) -> tuple[torch.Tensor, object, object]:
        """One optimizer step over this rank's share of the global batch, in micro-batches.
        The batch is the same windows as without accumulation; only the forward is cut up.
        Returns (the step's loss summed over ranks, a device tensor; the gradient norm, a device
        tensor or a number; the optimizer's ``Stopwatch``): nothing here reads the device."""
        g = self.geo
        batch = pinned(self.sampler.batch(self.seen + self.dp_rank * g.per_rank, g.per_rank), self.device)
        self.seen += self.cfg.train.global_batch
        total = torch.zeros((), device=self.device)
        for i in range(g.accumulation):
            micro = batch[i * g.micro:(i + 1) * g.micro].to(self.device, non_blocking=True)
            with self.autocast:
                logits = self.engine.forward(micro[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten())
            self.engine.micro_backward(loss, g.accumulation, last=i == g.accumulation - 1)
            total += loss.detach()
        step_loss = total / g.accumulation
        grad_norm, t_opt = self.engine.step(step_loss)
        return all_reduce_sum(step_loss.clone()), grad_norm, t_opt

    def record(self, step: int, lr: float, elapsed: float, timing: list[float]) -> dict:
        """The step's record from what the host knows at once; ``loss``, ``grad_norm`` and
        ``opt_step_s`` come from ``read_pending`` when the step is read."""
        t, seq = self.cfg.train, self.cfg.data.seq_len
        tokens_per_s = t.global_batch * seq / elapsed
        timed = timing[1:] or timing  # the first step compiles and warms up
        record = {"step": step + 1, "loss": None, "lr": lr, "grad_norm": None, "tokens": self.seen * seq,
                  "tokens_per_s": tokens_per_s, "opt_step_s": None,
                  "eta_s": eta_seconds(len(timed), t.steps - step - 1, sum(timed))}
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.world * self.peak_flops)
        momo = getattr(self.engine.optimizer, "last_momo", None)
        if momo:  # Momo's model-based step; the step taken is min(lr, this)
            record["momo_polyak_step"] = momo["polyak_step"] if math.isfinite(momo["polyak_step"]) else None
        return record

    def read_pending(self) -> list[dict]:
        """The losses, gradient norms and optimizer times of the steps trained since the last
        read: one host read for all their tensors (where a GPU's queue drains), then the
        optimizer's event times, which that read has made ready."""
        tensors = [v for loss, norm, _ in self.pending for v in (loss, norm) if torch.is_tensor(v)]
        values = iter(torch.stack([v.detach().to(self.device, torch.float64).reshape(()) for v in tensors]).tolist())
        read = [{"loss": next(values) / self.world,
                 "grad_norm": next(values) if torch.is_tensor(norm) else float("nan" if norm is None else norm),
                 "opt_step_s": stopwatch.seconds()} for _, norm, stopwatch in self.pending]
        self.pending.clear()
        return read

    def fit(self) -> bool:
        """Train to ``train.steps`` (True), or until a signal stops the run (False)."""
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a new metrics file; a resumed one appends (re-logged steps win).
        self.metrics = MetricsWriter(self.out, append=bool(self.start), tensorboard=t.tensorboard) if self.rank == 0 else None
        self.timing = []
        self.engine.train_mode()
        for step in range(self.start, t.steps):
            self.fit_step(step)
            signum = self.preemption.agreed() if step + 1 < t.steps else 0  # the last step just ends the run
            if signum:
                self.stop_preempted(step + 1, signum)
                return False
        self.wait_saves()
        if self.metrics:
            self.metrics.close()
        return True

    def fit_step(self, step: int) -> None:
        """Train one step; on the steps that log (``log_every``, the first, evaluation steps,
        the last) or save, read every pending step's values and write their records."""
        t = self.cfg.train
        last = step + 1 == t.steps
        evaluates = (step + 1) % t.eval_every == 0 or last
        logs = (step + 1) % t.log_every == 0 or evaluates or step == self.start
        saves = (step + 1) % t.checkpoint_every == 0 or last  # a checkpoint reads the state anyway
        t0 = time.perf_counter()
        lr = self.engine.lr
        self.pending.append(self.train_step())
        values = self.read_pending() if logs or saves else None  # waiting for the device is this step's time
        self.timing.append(time.perf_counter() - t0)
        self.unread.append(self.record(step, lr, self.timing[-1], self.timing))
        val_loss = None
        if evaluates:
            self.engine.eval_mode()
            val_loss = evaluate(self.engine.forward, self.val_windows, self.dp_rank, self.dp_size, self.device)
            self.engine.train_mode()
        if values is not None:  # on checkpoint steps too: a crash loses no record
            self.write_records(values, val_loss, logs)
        if saves:
            self.save(step + 1)
        for callback in self.callbacks:
            callback(self, step + 1)

    def write_records(self, values: list[dict], val_loss: float | None = None, logs: bool = False) -> None:
        """The unread steps' records completed with their read ``values``, written to the metrics
        (the last one logged when ``logs``)."""
        records, self.unread = self.unread, []
        for record, value in zip(records, values):
            record.update(value)
        if val_loss is not None:
            records[-1].update(val_loss=val_loss, val_ppl=math.exp(val_loss))
        if logs and self.device.type == "cuda":
            records[-1].update(cuda_memory_gib(self.device))
        if logs:
            self.log(format_line(records[-1], self.cfg.train.steps), flush=True)
        if self.metrics:
            for record in records:
                self.metrics.write(record)

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` and stamp each completed checkpoint with the run's identity
        (``run.json`` in its folder): a sync save at once, an async one once the next save (which
        first completes the one in flight) or ``wait_saves`` has completed it."""
        path = self.engine.save(step, self.seen)
        done, self.in_flight = self.in_flight, [(step, path)]
        if not self.engine.saves_async:
            done, self.in_flight = done + self.in_flight, []
        for saved_step, folder in done:
            self.run.stamp(folder, saved_step, self.rank)
        self.saved = (step, path)

    def wait_saves(self) -> None:
        """Complete the async save in flight, if any, and stamp it."""
        self.engine.wait()
        for saved_step, folder in self.in_flight:
            self.run.stamp(folder, saved_step, self.rank)
        self.in_flight = []

    def stop_preempted(self, step: int, signum: int) -> None:
        """Every rank is here after the same ``step`` (the agreement): write the steps not yet
        read, checkpoint this step unless it was just saved (an async save in flight completes
        first), complete every save, and say where the run can continue from."""
        if self.unread:
            self.write_records(self.read_pending())
        if self.saved is None or self.saved[0] != step:
            self.save(step)
        self.wait_saves()
        if self.metrics:
            self.metrics.close()
        self.stopped = (step, signum)
        self.log(f"preempted by {signal_name(signum)} after step {step}/{self.cfg.train.steps}: checkpoint "
                 f"{self.saved[1]} is complete; exiting with code {PREEMPTED_EXIT_CODE} (--resume auto continues "
                 f"run {self.run.run_id} from step {step})", flush=True)

    def finish(self) -> None:
        peaks = [peak_memory(self.device)]
        if dist.is_initialized():
            peaks = [None] * self.world
            dist.all_gather_object(peaks, peak_memory(self.device))
        if self.device.type == "cuda":
            self.log("peak memory per rank, GiB allocated (reserved, device used): "
                     + ", ".join(f"{a:.2f} ({r:.2f}, {u:.2f})" for a, r, u in peaks))
        else:
            self.log("peak memory per rank, GiB: " + ", ".join(f"{p[0]:.2f}" for p in peaks))
        if self.rank == 0:
            from .plot import plot_runs

            png = plot_runs([self.out / "metrics.jsonl"], self.out / "loss.png")
            final = read_metrics(self.out)[-1]
            if "val_ppl" in final:
                print(f"final validation perplexity {final['val_ppl']:.2f} (loss {final['val_loss']:.4f})")
            print(f"loss plot: {png}")


def format_line(record: dict, steps: int) -> str:
    val = f"  val loss {record['val_loss']:.3f} ppl {record['val_ppl']:.1f}" if "val_loss" in record else ""
    mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
    mem = ""
    if "mem_allocated_gib" in record:  # CUDA
        mem = (f"  mem {record['mem_allocated_gib']:.1f} GiB (reserved {record['mem_reserved_gib']:.1f}, device "
               f"{record['mem_device_used_gib']:.1f}/{record['mem_device_total_gib']:.0f})")
    return (f"step {record['step']:5d}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}  opt {record['opt_step_s'] * 1e3:.0f} ms{mem}  "
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
    if args.overwrite and args.resume != "none":
        print("error: --overwrite deletes a folder's checkpoints for a fresh start: it goes with --resume none",
              file=sys.stderr)
        return 2
    clear_marker()  # before the process group: no peer can have been preempted yet
    with Preemption() as preemption:  # from here on a signal waits for the next step boundary
        return train_distributed(args, cfg, callbacks, preemption)


def train_distributed(args, cfg, callbacks, preemption: Preemption) -> int:
    """The distributed part of ``main``: 0 when the run is complete, PREEMPTED_EXIT_CODE when a
    signal stopped it after a checkpoint, 2 for an input or folder refused on every rank."""
    rank, world, device = setup_distributed(timeout_s=cfg.parallel.timeout_s)
    preemption.connect(device)
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

    try:  # after the data: a refused source leaves no folder behind
        folder = claim(cfg, args.resume, args.overwrite, rank)
    except RunFolderError as e:  # decided by rank 0, raised on every rank alike
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _leave(2)
    with folder:
        trainer = Trainer(cfg, args, rank, world, device, geometry, data, callbacks, run=folder, preemption=preemption)
        finished = trainer.fit()
        if finished:
            trainer.finish()
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing down gloo while a peer still works aborts
    if not finished:
        write_marker(*trainer.stopped)
        return _leave(PREEMPTED_EXIT_CODE)
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
