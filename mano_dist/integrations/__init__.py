"""Mano where users already train: the Hugging Face Transformers ``Trainer`` and Accelerate
(here), torchtitan (``torchtitan``, ``torchtitan_configs``), PyTorch Lightning (``lightning``)
and OLMo-core (``olmo_core``).

Import-light on purpose: nothing here imports transformers, accelerate, deepspeed or any of the
frameworks until used; each framework's module imports it when imported.

- :class:`ManoFactory`: ``Trainer(..., optimizer_cls_and_kwargs=(ManoFactory, {"lr": 1e-3}))``
  or ``ManoFactory.from_args(training_args)`` (see ``hf_trainer.py``).
- Accelerate's FSDP2 path needs nothing extra: :class:`mano_dist.Mano` re-binds its state to the
  sharded params that ``Accelerator.prepare`` swaps into its param groups.
- DeepSpeed (``--deepspeed ds.json`` or an Accelerate DeepSpeed plugin): ``"type": "Mano"`` in the
  JSON after ``import mano_dist.deepspeed``.

See docs/integrations.md.
"""

from __future__ import annotations

__all__ = ["ManoFactory", "trainer_param_groups"]


def __getattr__(name: str):
    if name in __all__:
        from . import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
