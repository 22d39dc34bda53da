"""The hooks into DeepSpeed's engine (deepspeed==0.19.8), all in one place.

- ``torch.optim.Mano`` exists, so the config validator accepts ``"type": "Mano"``;
- ``DeepSpeedEngine._configure_basic_optimizer`` builds it with the engine's module in hand
  (routing embeddings/head/1-D params to AdamW, checking the "params" keys);
- ``DeepSpeedEngine._configure_optimizer`` attaches the optimizer to ZeRO's flat partitions
  afterwards, and refuses a plain :class:`mano_dist.Mano` under ZeRO >= 1 (it would see flat
  1-D partitions with no layout);
- DeepSpeedMano is listed as a ZeRO-supported optimizer (no ``zero_allow_untested_optimizer``).
"""

from __future__ import annotations

import torch

from ..optimizer import Mano
from .builder import build_optimizer
from .optimizer import DeepSpeedMano

CONFIG_NAME = "Mano"
_PATCHED = "_mano_dist_patched"


def register() -> None:
    """Make DeepSpeed know ``"type": "Mano"`` (idempotent)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    setattr(torch.optim, CONFIG_NAME, DeepSpeedMano)
    if DeepSpeedMano not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedMano)
    if getattr(DeepSpeedEngine, _PATCHED, False):
        return
    original_basic = DeepSpeedEngine._configure_basic_optimizer
    original_configure = DeepSpeedEngine._configure_optimizer

    def _configure_basic_optimizer(self, model_parameters):
        if self.optimizer_name() == CONFIG_NAME:
            return build_optimizer(self.module, model_parameters, self.optimizer_params())
        return original_basic(self, model_parameters)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        stage = self.zero_optimization_stage()
        if isinstance(client_optimizer, Mano) and not isinstance(client_optimizer, DeepSpeedMano) and stage >= 1:
            raise ValueError(
                f"A plain mano_dist.Mano cannot run under DeepSpeed ZeRO stage {stage}: ZeRO hands it "
                "flat 1-D partitions without the layout of the matrices. Use "
                'mano_dist.deepspeed.DeepSpeedMano(...) or "optimizer": {"type": "Mano"} in the config '
                "(after `import mano_dist.deepspeed`)."
            )
        building = [o for o in (client_optimizer,) if isinstance(o, DeepSpeedMano)]
        for o in building:
            o._engine_building = True
        try:
            original_configure(self, client_optimizer, model_parameters)
        finally:
            for o in building + [getattr(self, "basic_optimizer", None)]:
                if isinstance(o, DeepSpeedMano):
                    o._engine_building = False
        if isinstance(self.basic_optimizer, DeepSpeedMano):
            self.basic_optimizer.attach(self)

    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    setattr(DeepSpeedEngine, _PATCHED, True)


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` with Mano registered (same arguments and returns)."""
    import deepspeed

    register()
    return deepspeed.initialize(*args, **kwargs)
