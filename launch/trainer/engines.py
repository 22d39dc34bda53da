"""The two ways the trainer runs a model: FSDP2 (+ TP) with our Checkpointer, or a DeepSpeed
engine from a JSON config. Both expose the same few calls, so the training loop is one loop.

- ``forward(tokens)``; per micro-batch ``micro_backward(loss, accumulation, last)`` (``loss`` the
  micro-batch's mean token loss); then ``step(loss) -> (grad_norm, stopwatch)`` once per
  optimizer step (``loss`` the step's mean, for the optimizers that use it). Neither value is
  read on the host here: ``grad_norm`` is a device tensor (or whatever DeepSpeed holds), and the
  optimizer's time is a ``launch.trainer.metrics.Stopwatch`` (CUDA events on CUDA); the trainer reads
  both when it logs
- ``lr``, ``save(step, sequences_seen) -> path`` (the checkpoint folder, complete on return unless
  ``saves_async``, then once ``wait()`` returns), ``load(resume) -> (step, sequences_seen, path) | None``
- ``eval_mode()`` / ``train_mode()``, ``module`` and ``wait()`` (async saves in flight).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mano_dist import baselines
from mano_dist.checkpoint import Checkpointer

from ..config import ConfigError, RunConfig
from .metrics import Stopwatch
from .parallel import clip_grad_norm


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine from 1 to ``min_lr_ratio`` at the last step (the paper's schedule)."""
    import math

    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trainer_optimizer(model, cfg: RunConfig):
    """Any optimizer of ``mano_dist.baselines.NAMES`` by ``optim.name``, same parameter routing."""
    o = cfg.optim
    return baselines.build_optimizer(o.name, model, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                     nesterov=o.nesterov, variant=o.variant, adamw_betas=o.betas,
                                     adamw_lr=o.adamw_lr)


class FSDPEngine:
    def __init__(self, model, cfg: RunConfig, out: Path):
        self.module, self.cfg = model, cfg
        self.device = next(iter(model.parameters())).device
        self.optimizer = trainer_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.train.keep_last,
                                 async_save=cfg.train.async_checkpoint)
        self.saves_async = cfg.train.async_checkpoint

    def forward(self, tokens):
        return self.module(tokens)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def micro_backward(self, loss, accumulation: int, last: bool) -> None:
        """Gradients of the micro-batch mean scaled by 1/accumulation: summed over the micro-steps
        they equal the gradient of the whole per-rank batch's mean. FSDP2 reduce-scatters every
        micro-step (no ``set_requires_gradient_sync(False)``): skipping it would keep unsharded
        fp32 gradients of the whole model on every rank, the memory sharding exists to save,
        while on GPUs the reduce-scatter overlaps the backward."""
        (loss / accumulation).backward()

    def step(self, loss) -> tuple[torch.Tensor, Stopwatch]:
        grad_norm = clip_grad_norm(self.module.parameters(), self.cfg.optim.grad_clip)
        with Stopwatch(self.device) as stopwatch:
            if baselines.needs_loss(self.optimizer):
                self.optimizer.step(loss=loss.detach())
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, stopwatch

    def save(self, step: int, seen: int) -> Path:
        return Path(self.ckpt.save(step, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                                   extra={"data": {"sequences_seen": seen}}))

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


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DS_OPTIMIZER_TYPES = {"mano": "Mano", "adamw": "AdamW"}


def deepspeed_config(cfg: RunConfig, dp_size: int) -> tuple[dict, list[str]]:
    """The JSON config the engine gets, and notes on what was filled in from the run config.

    - Batch: the JSON's batch keys are honoured. ``train.micro_batch`` unset (0) takes the
      JSON's ``train_micro_batch_size_per_gpu`` (else derives it from its
      ``gradient_accumulation_steps``, else the whole per-rank batch); every key the JSON sets
      must then agree with ``train.global_batch`` over the ranks, or a ConfigError says which
      and how to fix it. Missing keys are filled in.
    - Optimizer: ``[optim]`` governs. A JSON ``"optimizer"`` must name the same type as
      ``optim.name`` (else a ConfigError); its params are set from ``[optim]`` (lr: the peak of
      the run's schedule), each change listed in the notes.
    - ``gradient_clipping`` from ``optim.grad_clip`` when the JSON sets none; bf16 is the
      JSON's ``"bf16"`` section (``train.mixed_precision = "bf16"`` requires it enabled).
    """
    path = Path(cfg.parallel.ds_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"parallel.ds_config {path}: {e}") from None
    notes = _deepspeed_batch(cfg, ds, dp_size, path) + _deepspeed_optimizer(cfg, ds, path)
    ds.setdefault("gradient_clipping", cfg.optim.grad_clip)
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if cfg.train.mixed_precision == "bf16" and not bf16:
        raise ConfigError(f'train.mixed_precision = "bf16" with parallel.engine = deepspeed needs '
                          f'"bf16": {{"enabled": true}} in {path}: under DeepSpeed the JSON governs precision')
    return ds, notes


def _deepspeed_batch(cfg: RunConfig, ds: dict, dp_size: int, path: Path) -> list[str]:
    t = cfg.train
    per_rank = t.global_batch // dp_size
    micro = t.micro_batch or ds.get("train_micro_batch_size_per_gpu", 0)
    if not micro and ds.get("gradient_accumulation_steps"):
        micro = per_rank // ds["gradient_accumulation_steps"] or per_rank
    micro = micro or per_rank
    if per_rank % micro:
        raise ConfigError(f"micro-batch {micro} (train.micro_batch, else {path}'s train_micro_batch_size_per_gpu) "
                          f"does not divide the {per_rank} sequences per rank (train.global_batch "
                          f"{t.global_batch} over {dp_size} data-parallel ranks)")
    want = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": per_rank // micro}
    wrong = [f"{k} = {ds[k]} (the run needs {v})" for k, v in want.items() if k in ds and ds[k] != v]
    if wrong:
        raise ConfigError(f"{path}: {', '.join(wrong)}: train.global_batch {t.global_batch} over {dp_size} "
                          f"data-parallel ranks in micro-batches of {micro} (train.micro_batch {t.micro_batch}); "
                          f"make them agree or drop the key from the JSON")
    notes = [f"{k} = {v} (from train.*)" for k, v in want.items() if k not in ds]
    ds.update(want)
    return notes


def _deepspeed_optimizer(cfg: RunConfig, ds: dict, path: Path) -> list[str]:
    o = cfg.optim
    if o.name not in DS_OPTIMIZER_TYPES:
        raise ConfigError(f"parallel.engine = deepspeed runs optim.name mano or adamw, not {o.name!r}")
    if o.adamw_lr is not None:
        raise ConfigError("optim.adamw_lr is not supported with parallel.engine = deepspeed (the JSON optimizer "
                          "has one lr for all groups); unset it")
    kind = DS_OPTIMIZER_TYPES[o.name]
    want = {"lr": o.lr, "weight_decay": o.weight_decay}
    if kind == "Mano":
        want |= {"momentum": o.momentum, "nesterov": o.nesterov, "variant": o.variant, "adamw_betas": list(o.betas)}
    else:
        want |= {"betas": list(o.betas)}
    if "optimizer" not in ds:
        ds["optimizer"] = {"type": kind, "params": want}
        return [f"optimizer {kind} from [optim]"]
    named = ds["optimizer"].get("type", "")
    if named.lower() != kind.lower():
        raise ConfigError(f"{path} names optimizer {named!r} but optim.name = {o.name!r}: set optim.name to match, "
                          f"or remove the JSON's \"optimizer\" section to run [optim]")
    params = ds["optimizer"].setdefault("params", {})
    notes = [f"optimizer.params.{k} {params[k]} -> {v} (from [optim])" for k, v in want.items()
             if k in params and params[k] != v and k != "lr"]
    params.update(want)
    return notes


def describe_optimizer(ds: dict) -> str:
    """What actually runs, for the start-up line."""
    opt = ds["optimizer"]
    return f"{opt['type']} ({', '.join(f'{k}={v}' for k, v in opt.get('params', {}).items())}) from DeepSpeed"


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3 from the JSON) with the run's warmup + cosine schedule;
    checkpoints through ``engine.save_checkpoint`` with the data position as client state."""

    def __init__(self, model, cfg: RunConfig, out: Path, config: dict):
        import mano_dist.deepspeed as mds

        self.cfg = cfg
        self.folder = out / "ds_checkpoints"
        self.saves_async = False
        self.engine, self.optimizer, _, self.scheduler = mds.initialize(
            model=model, model_parameters=model.parameters(), config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
        self.module = self.engine

    def forward(self, tokens):
        return self.engine(tokens)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def micro_backward(self, loss, accumulation: int, last: bool) -> None:
        """DeepSpeed scales by 1/gradient_accumulation_steps itself and only steps at the
        accumulation boundary; its ``step()`` must still be called after every micro-batch."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()

    def step(self, loss):
        """Returns (DeepSpeed's global gradient norm as it holds it: a tensor, a float, or None
        when it computes none, unread; the stopwatch of the engine's step)."""
        with Stopwatch(self.engine.device) as stopwatch:
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm.detach() if torch.is_tensor(norm) else norm, stopwatch

    def save(self, step: int, seen: int) -> Path:
        from mano_dist.deepspeed.checkpoint import save_run

        save_run(self.engine, str(self.folder), f"step-{step}", {"step": step, "sequences_seen": seen},
                 keep_last=self.cfg.train.keep_last)
        return self.folder / f"step-{step}"

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
