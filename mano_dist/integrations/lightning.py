"""Mano in PyTorch Lightning: :func:`mano_optimizer` for ``LightningModule.configure_optimizers``.

Import-light: Lightning (``lightning`` or ``pytorch_lightning``) is never imported here; the
strategy is recognised by its class name, so both packages work.

- ``ModelParallelStrategy`` (FSDP2, optionally TP): ``configure_model`` shards, then Lightning
  calls ``configure_optimizers``, so Mano is built on the DTensors. Sharded and full checkpoints
  resume exactly (``tests/test_lightning.py``).
- ``DeepSpeedStrategy``: ZeRO replaces the params by flat partitions. :func:`mano_optimizer`
  returns :class:`mano_dist.deepspeed.DeepSpeedMano` there (routed by name here, before
  Lightning hands DeepSpeed a nameless ``filter(requires_grad, parameters())``); a plain
  :class:`mano_dist.Mano` is refused by DeepSpeed's engine hook.
- ``FSDPStrategy`` (FSDP1) flattens every param into a 1-D shard before
  ``configure_optimizers``: no matrix is left for Mano. :func:`mano_optimizer` raises a
  ``ValueError`` naming ``ModelParallelStrategy``; without the check, name routing would send
  every (now 1-D) param to AdamW and the run would silently train with AdamW only.

See docs/integrations.md, "PyTorch Lightning".
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..optimizer import Mano
from ..param_groups import mano_param_groups

__all__ = ["mano_optimizer", "check_strategy"]

FSDP1_MESSAGE = (
    "Mano needs each param to keep its matrix shape, which Lightning's FSDPStrategy (FSDP1, "
    "FullyShardedDataParallel) flattens into 1-D shards before configure_optimizers runs{where}. "
    "Use strategy=ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) and shard "
    "with torch.distributed.fsdp.fully_shard (FSDP2) in LightningModule.configure_model."
)


def _strategy(module: nn.Module):
    """The Trainer's strategy, or None for a module not attached to a Trainer."""
    trainer = getattr(module, "_trainer", None)  # LightningModule.trainer raises when detached
    return getattr(trainer, "strategy", None) if trainer is not None else None


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _flattened(module: nn.Module) -> list[str]:
    """Names of Linear/Embedding weights that are no longer 2-D (FSDP1 flat-parameter views)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return ["FullyShardedDataParallel modules"]
    names = []
    for mod_name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if (isinstance(sub, (nn.Linear, nn.Embedding)) and weight is not None and weight.ndim != 2
                and not hasattr(weight, "ds_shape")):  # deepspeed.zero.Init: (0,), true shape in ds_shape
            names.append(f"{mod_name}.weight" if mod_name else "weight")
        if type(weight).__name__ == "FlatParameter":
            names.append(f"{mod_name}.weight")
    return names


def check_strategy(module: nn.Module) -> str | None:
    """Raise for a layout Mano cannot step (FSDP1); return ``"deepspeed"`` under
    ``DeepSpeedStrategy``, else None."""
    strategy = _strategy(module)
    names = _class_names(strategy) if strategy is not None else set()
    if "FSDPStrategy" in names:
        raise ValueError(FSDP1_MESSAGE.format(where=""))
    if "DeepSpeedStrategy" in names:  # ZeRO-3 params are (0,)-shaped here, with their ds_shape
        return "deepspeed"
    flat = _flattened(module)
    if flat:
        raise ValueError(FSDP1_MESSAGE.format(where=f" (found: {', '.join(flat[:3])})"))
    return None


def mano_optimizer(
    module: nn.Module,
    *,
    adamw_patterns: Iterable[str] = (),
    mano_patterns: Iterable[str] = (),
    mano_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
    splits=None,
    **mano_kwargs: Any,
) -> Mano:
    """``return mano_optimizer(self, lr=1e-3, variant="v2")`` in ``configure_optimizers``.

    Routes ``module``'s params with :func:`mano_dist.mano_param_groups` (Mano for hidden
    matrices; AdamW for embeddings, the head, norms and biases; the routing options are its own)
    and builds :class:`mano_dist.Mano` with ``mano_kwargs`` (``lr``, ``weight_decay``,
    ``momentum``, ``variant``, ``adamw_betas``, ...). Under ``DeepSpeedStrategy`` it builds
    :class:`mano_dist.deepspeed.DeepSpeedMano` from the same groups (importing
    ``mano_dist.deepspeed``, which registers Mano with DeepSpeed). Under ``FSDPStrategy`` (FSDP1)
    it raises a ``ValueError`` naming ``ModelParallelStrategy``.
    """
    kind = check_strategy(module)
    groups = mano_param_groups(module, adamw_patterns=adamw_patterns, mano_patterns=mano_patterns,
                               mano_options=mano_options, adamw_options=adamw_options, splits=splits)
    if kind == "deepspeed":
        from ..deepspeed import DeepSpeedMano  # importing registers Mano with DeepSpeed

        return DeepSpeedMano(groups, **mano_kwargs)
    return Mano(groups, **mano_kwargs)
