"""The two ways the trainer runs a model: FSDP2 (+ TP) with our Checkpointer, or a DeepSpeed
engine from a JSON config. Both expose the same few calls, so the training loop is one loop.

- ``forward(tokens)``, ``backward_step(loss) -> (grad_norm, optimizer_seconds)``
- ``lr``, ``save(step, sequences_seen)``, ``load(resume) -> (step, sequences_seen, path) | None``
- ``eval_mode()`` / ``train_mode()``, ``module`` and ``wait()`` (async saves in flight).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mano_dist import baselines
from mano_dist.checkpoint import Checkpointer

from .config import ConfigError, RunConfig
from .parallel import clip_grad_norm


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine from 1 to ``min_lr_ratio`` at the last step (the paper's schedule)."""
    import math

    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model, cfg: RunConfig):
    """Any optimizer of ``mano_dist.baselines.NAMES`` by ``optim.name``, same parameter routing."""
    o = cfg.optim
    return baselines.build_optimizer(o.name, model, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                     nesterov=o.nesterov, variant=o.variant, adamw_betas=o.betas,
                                     adamw_lr=o.adamw_lr)


class FSDPEngine:
    def __init__(self, model, cfg: RunConfig, out: Path):
        self.module, self.cfg = model, cfg
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.train.keep_last,
                                 async_save=cfg.train.async_checkpoint)

    def forward(self, tokens):
        return self.module(tokens)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward_step(self, loss) -> tuple[float, float]:
        loss.backward()
        grad_norm = clip_grad_norm(self.module.parameters(), self.cfg.optim.grad_clip)
        t0 = time.perf_counter()
        if baselines.needs_loss(self.optimizer):
            self.optimizer.step(loss=loss.detach())
        else:
            self.optimizer.step()
        seconds = time.perf_counter() - t0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, seconds

    def save(self, step: int, seen: int) -> None:
        self.ckpt.save(step, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                       extra={"data": {"sequences_seen": seen}})

    def load(self, resume: str):
        info = self.ckpt.load(model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                              path="auto" if resume == "auto" else resume)
        if info is None:
            return None
        return info["step"], info["extra"]["data"]["sequences_seen"], info["path"]

    def eval_mode(self):
        self.module.eval()

    def train_mode(self):
        self.module.train()

    def wait(self) -> None:
        self.ckpt.wait()


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    """The JSON config with the run's batch geometry (``train.global_batch`` over the ranks, no
    accumulation: the JSON's batch keys are replaced, with a note) and gradient clipping when
    the JSON sets none; the optimizer from ``[optim]`` when the JSON names none."""
    path = Path(cfg.parallel.ds_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"parallel.ds_config {path}: {e}") from None
    per_rank = cfg.train.global_batch // dp_size
    for key, want in (("train_batch_size", cfg.train.global_batch), ("train_micro_batch_size_per_gpu", per_rank),
                      ("gradient_accumulation_steps", 1)):
        if key in ds and ds[key] != want:
            print(f"note: {path}: {key} {ds[key]} -> {want} (train.global_batch {cfg.train.global_batch} "
                  f"over {dp_size} ranks)", flush=True)
        ds[key] = want
    ds.setdefault("gradient_clipping", cfg.optim.grad_clip)
    o = cfg.optim
    if "optimizer" not in ds:
        if o.name == "mano":
            ds["optimizer"] = {"type": "Mano", "params": {
                "lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay,
                "variant": o.variant, "adamw_betas": list(o.betas)}}
        elif o.name == "adamw":
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas),
                                                           "weight_decay": o.weight_decay}}
        else:
            raise ConfigError(f"parallel.engine = deepspeed runs optim.name mano or adamw, not {o.name!r}")
    elif "lr" in ds["optimizer"].get("params", {}):
        ds["optimizer"]["params"]["lr"] = o.lr  # the run's peak lr drives the schedule
    return ds


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3 from the JSON) with the run's warmup + cosine schedule;
    checkpoints through ``engine.save_checkpoint`` with the data position as client state."""

    def __init__(self, model, cfg: RunConfig, out: Path, dp_size: int):
        import mano_dist.deepspeed as mds

        self.cfg = cfg
        self.folder = out / "ds_checkpoints"
        config = deepspeed_config(cfg, dp_size)
        self.engine, self.optimizer, _, self.scheduler = mds.initialize(
            model=model, model_parameters=model.parameters(), config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
        self.module = self.engine

    def forward(self, tokens):
        return self.engine(tokens)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward_step(self, loss) -> tuple[float, float]:
        self.engine.backward(loss)
        t0 = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - t0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), seconds

    def save(self, step: int, seen: int) -> None:
        from mano_dist.deepspeed.checkpoint import save_run

        save_run(self.engine, str(self.folder), f"step-{step}", {"step": step, "sequences_seen": seen})

    def load(self, resume: str):
        """Any data-parallel world size: the converter restores weights, optimizer, schedule, RNG."""
        from mano_dist.deepspeed.checkpoint import load_run

        folder, tag = (self.folder, None) if resume == "auto" else (Path(resume).parent, Path(resume).name)
        info = load_run(self.engine, str(folder), tag)
        if info is None:
            return None
        path, client = info
        return client["step"], client["sequences_seen"], path

    def eval_mode(self):
        self.engine.eval()

    def train_mode(self):
        self.engine.train()

    def wait(self) -> None:
        pass
