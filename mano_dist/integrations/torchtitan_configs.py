"""torchtitan config functions that train with Mano (``--module`` / ``--config``, torchtitan 0.3.0)::

    torchrun --nproc-per-node 8 -m torchtitan.train \\
        --module mano_dist.integrations.torchtitan_configs --config mano_llama3_debugmodel

Each function is torchtitan's own config of the same name with ``optimizer`` replaced by
:func:`mano_dist.integrations.torchtitan.mano_optimizer_config` (Mano for the hidden matrices,
fused ``wqkv`` split by KV group, AdamW fallback for embedding, head, norms). CLI overrides work
as usual (``--training.steps 100``, ``--parallelism.data_parallel_shard_degree 8``). LR
schedules apply to every group (torchtitan's ``LambdaLR`` scales each group's ``lr``).
Importing this module imports torchtitan.
"""

from __future__ import annotations

from torchtitan.models.llama3 import config_registry as _llama3
from torchtitan.trainer import Trainer

from .torchtitan import mano_optimizer_config

__all__ = ["mano_llama3_debugmodel", "mano_llama3_8b", "with_mano"]


def with_mano(config: Trainer.Config, *, lr: float = 1e-3, weight_decay: float = 0.1, **mano_kwargs) -> Trainer.Config:
    """``config`` with its optimizer replaced by Mano (see ``mano_optimizer_config`` for
    ``mano_kwargs``: ``variant``, ``momentum``, ``adamw_lr``, ``nonfinite``, ``fused``, ...)."""
    config.optimizer = mano_optimizer_config(config.model_spec.model, lr=lr, weight_decay=weight_decay,
                                             **mano_kwargs)
    return config


def mano_llama3_debugmodel() -> Trainer.Config:
    """torchtitan's ``llama3_debugmodel`` (dim 256, 6 layers, 16 heads) with Mano, lr 1e-3."""
    return with_mano(_llama3.llama3_debugmodel(), lr=1e-3)


def mano_llama3_8b() -> Trainer.Config:
    """torchtitan's ``llama3_8b`` (32 heads, 8 KV heads: ``wqkv`` splits (512, 128, 128) x 8) with
    Mano, lr 1e-3, weight decay 0.1."""
    return with_mano(_llama3.llama3_8b(), lr=1e-3, weight_decay=0.1)
