"""The hooks into DeepSpeed's engine (deepspeed==0.19.8), all in one place.

- ``torch.optim.Mano`` exists, so the config validator accepts ``"type": "Mano"``;
- ``DeepSpeedEngine._configure_basic_optimizer`` builds it with the engine's module in hand
  (routing embeddings/head/1-D params to AdamW, checking the "params" keys);
- ``DeepSpeedEngine._configure_optimizer`` attaches the optimizer to ZeRO's flat partitions
  afterwards, and refuses a plain :class:`mano_dist.Mano` under ZeRO >= 1 (it would see flat
  1-D partitions with no layout);
- DeepSpeedMano is listed as a ZeRO-supported optimizer (no ``zero_allow_untested_optimizer``);
- ``DeepSpeedEngine.load_checkpoint`` refuses a universal checkpoint
  (``"checkpoint": {"load_universal": true}``) for Mano's optimizer state, before reading anything:
  DeepSpeed 0.19.8's ``ds_to_universal`` converts only Adam's ``exp_avg``/``exp_avg_sq``, so
  Mano's momentum and rotation phase cannot travel through it (see :data:`UNIVERSAL_ERROR`).
"""

from __future__ import annotations

import torch

from ..optimizer import Mano
from .builder import build_optimizer
from .optimizer import DeepSpeedMano

CONFIG_NAME = "Mano"
_PATCHED = "_mano_dist_patched"
UNIVERSAL_ERROR = (
    'A DeepSpeed universal checkpoint ("checkpoint": {"load_universal": true}) cannot carry Mano\'s '
    "optimizer state: DeepSpeed 0.19.8's ds_to_universal converts only Adam's exp_avg/exp_avg_sq, "
    "so the momentum and the row/column rotation phase would be lost. To resume at another world size, "
    "load the ordinary ZeRO checkpoint with mano_dist.deepspeed.checkpoint.load_run / load_resharded, "
    "or consolidate it offline with `python -m mano_dist.deepspeed.checkpoint CKPT_DIR TAG OUT.pt` "
    "(load_universal off). Loading weights only (load_module_only=True or load_optimizer_states=False) works."
)


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
    original_load = DeepSpeedEngine.load_checkpoint

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

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        # Decided from the config alone, so every rank raises alike before any collective.
        if (isinstance(getattr(self, "basic_optimizer", None), DeepSpeedMano) and self.load_universal_checkpoint()
                and load_optimizer_states and not load_module_only):
            raise ValueError(UNIVERSAL_ERROR)
        return original_load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                             load_lr_scheduler_states, load_module_only, custom_load_fn)

    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    DeepSpeedEngine.load_checkpoint = load_checkpoint
    setattr(DeepSpeedEngine, _PATCHED, True)


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` with Mano registered (same arguments and returns)."""
    import deepspeed

    register()
    return deepspeed.initialize(*args, **kwargs)
