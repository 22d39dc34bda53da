"""Mano in the Transformers ``Trainer``: an optimizer factory for ``optimizer_cls_and_kwargs``.

Given an optimizer *class*, ``Trainer.create_optimizer`` builds two nameless groups split only by
weight decay, so 1-D params, embeddings and the head would all reach Mano. Anything that is not
an ``Optimizer`` subclass is treated as a factory and called as ``factory()(model, **kwargs)``
(Transformers >= 5), which lets us route by module and name like :func:`mano_param_groups`.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..optimizer import Mano
from ..param_groups import mano_param_groups


def _trainer_decay_names(model: nn.Module) -> set[str]:
    """The Trainer's own rule for which params get weight decay (not biases, not norms)."""
    from transformers import Trainer

    # An instance method that does not use its instance (Transformers 5.x): the Trainer's rule,
    # not a copy of its name patterns.
    return set(Trainer.get_decay_parameter_names(None, model))


def trainer_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    adamw_patterns: Iterable[str] = (),
    mano_patterns: Iterable[str] = (),
    mano_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`mano_param_groups`, each group split the way the Trainer splits weight decay:
    ``weight_decay`` where the Trainer decays, 0 on biases and norms. Empty groups are left out."""
    decay = _trainer_decay_names(model)
    groups = []
    for group in mano_param_groups(model, adamw_patterns=adamw_patterns, mano_patterns=mano_patterns,
                                   mano_options=mano_options, adamw_options=adamw_options):
        for decayed in (True, False):
            keep = [i for i, name in enumerate(group["param_names"]) if (name in decay) == decayed]
            if keep:
                groups.append({
                    "weight_decay": weight_decay if decayed else 0.0,
                    **group,
                    "params": [group["params"][i] for i in keep],
                    "param_names": [group["param_names"][i] for i in keep],
                })
    return groups


def _accelerate_uses_deepspeed() -> bool:
    """Whether the Trainer's Accelerator runs DeepSpeed (then ZeRO owns the params' layout)."""
    import sys

    if "accelerate" not in sys.modules:
        return False
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    return is_initialized() and AcceleratorState().distributed_type == DistributedType.DEEPSPEED


def _refuse_flattened_params(model: nn.Module) -> None:
    """FSDP1 (``fsdp_version: 1``) flattens params into 1-D shards before the Trainer builds the
    optimizer: no matrix is left for Mano, and every param would silently land on AdamW."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "Mano needs each param to keep its matrix shape, which FSDP1 (FullyShardedDataParallel) "
            'flattens away. Use FSDP2: fsdp_config={"fsdp_version": 2} in TrainingArguments, or '
            "FullyShardedDataParallelPlugin(fsdp_version=2) with Accelerate."
        )


class ManoFactory:
    """``Trainer(..., optimizer_cls_and_kwargs=(ManoFactory, {"lr": 1e-3, "variant": "v2"}))``.

    The kwargs are :class:`mano_dist.Mano`'s (``lr``, ``weight_decay``, ``momentum``, ``variant``,
    ``adamw_betas``...) plus the routing options of :func:`trainer_param_groups`. Mano gets the
    hidden matrices, AdamW the embeddings, the head and 1-D params; weight decay is not applied
    to biases and norms (the Trainer's rule). :meth:`from_args` takes lr, weight decay and the
    Adam betas/eps from ``TrainingArguments``.

    Under ``--deepspeed`` without an ``"optimizer"`` in the JSON the Trainer calls this factory
    too; it then builds :class:`mano_dist.deepspeed.DeepSpeedMano`, which the engine binds to
    ZeRO's flat partitions.
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        adamw_patterns: Iterable[str] = (),
        mano_patterns: Iterable[str] = (),
        mano_options: dict[str, Any] | None = None,
        adamw_options: dict[str, Any] | None = None,
        **mano_kwargs: Any,
    ) -> Mano:
        _refuse_flattened_params(model)
        weight_decay = mano_kwargs.pop("weight_decay", mano_kwargs.pop("wd", 0.1))
        groups = trainer_param_groups(model, weight_decay, adamw_patterns=adamw_patterns,
                                      mano_patterns=mano_patterns, mano_options=mano_options,
                                      adamw_options=adamw_options)
        if _accelerate_uses_deepspeed():
            from ..deepspeed import DeepSpeedMano  # importing registers Mano with DeepSpeed

            return DeepSpeedMano(groups, weight_decay=weight_decay, **mano_kwargs)
        return Mano(groups, weight_decay=weight_decay, **mano_kwargs)

    @staticmethod
    def from_args(args, **overrides: Any) -> tuple[type["ManoFactory"], dict[str, Any]]:
        """``optimizer_cls_and_kwargs`` with lr, weight decay and Adam betas/eps from
        ``TrainingArguments`` (``overrides`` win): ``Trainer(..., optimizer_cls_and_kwargs=
        ManoFactory.from_args(args, variant="v2"))``."""
        kwargs = {
            "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "adamw_betas": (args.adam_beta1, args.adam_beta2),
            "adamw_eps": args.adam_epsilon,
        }
        return ManoFactory, {**kwargs, **overrides}
