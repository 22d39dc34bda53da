"""DeepSpeed integration: ``"optimizer": {"type": "Mano", "params": {...}}`` for ZeRO stages 0-3.

Importing this module registers Mano with DeepSpeed (:func:`register`, idempotent)::

    import deepspeed
    import mano_dist.deepspeed  # noqa: F401  (registers "Mano")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config="configs/ds_zero2.json")

or use :func:`initialize`, a drop-in for ``deepspeed.initialize``. See docs/deepspeed.md.
"""

from __future__ import annotations

from .builder import MANO_CONFIG_KEYS, build_optimizer
from .optimizer import DeepSpeedMano
from .registration import initialize, register

__all__ = ["DeepSpeedMano", "build_optimizer", "initialize", "register", "MANO_CONFIG_KEYS"]

register()
