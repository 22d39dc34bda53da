"""Mano in OLMo-core 3.0: ``ManoConfig``, registered as ``"mano"`` with ``OptimConfig``.

Importing this module imports ``olmo_core`` and registers the config (``import mano_dist`` and
``import mano_dist.integrations`` never import it)::

    from mano_dist.integrations.olmo_core import ManoConfig

    optim = ManoConfig(lr=1e-3, weight_decay=0.1, variant="v2")   # in a TransformerTrainModuleConfig
    optimizer = optim.build(model)   # after the model is parallelised (FSDP2 / HSDP / TP)

or, from a serialised config, ``OptimConfig.from_dict({"type": "mano", ...})`` once this
module is imported. Routing is OLMo-core's own ``MatrixAwareOptimConfig.categorize_parameters``
(the same split as its Muon): the 2-D params of ``blocks`` go to Mano; embeddings (weight decay
``embedding_weight_decay``, 0 by default, as OLMo-core's Muon), the LM head and every 1-D param
(norms, biases) to Mano's AdamW fallback with ``betas``/``adamw_eps``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from olmo_core.optim.config import MatrixAwareOptimConfig, OptimConfig, OptimGroupOverride

from ..optimizer import Mano

__all__ = ["ManoConfig"]


@OptimConfig.register("mano")
@dataclass
class ManoConfig(MatrixAwareOptimConfig):
    """OLMo-core config for :class:`mano_dist.Mano` (see docs/integrations.md, "OLMo-core")."""

    lr: float = 1e-3
    """Learning rate of every group (Mano's update has an RMS of 0.2 * lr, like AdamW's)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the Mano matrices, the LM head and the 1-D params."""
    embedding_weight_decay: float = 0.0
    """Weight decay of the embeddings."""
    momentum: float = 0.95
    """Mano's heavy-ball momentum."""
    nesterov: bool = True
    variant: str = "v2"
    """``"v1"``, ``"v2"`` or ``"both"``."""
    eps: float = 1e-8
    """Mano's normalisation epsilon."""
    betas: Tuple[float, float] = (0.9, 0.95)
    """Betas of the AdamW fallback (embeddings, LM head, norms, biases)."""
    adamw_eps: float = 1e-8
    nonfinite: str = "skip"
    """``"skip"``, ``"raise"`` or ``"ignore"`` (see :class:`mano_dist.Mano`)."""
    fused: Optional[bool] = None
    """Compiled step; None: on for accelerator params, off on CPU."""

    @classmethod
    def optimizer(cls) -> type:
        return Mano

    def default_group_overrides(self, model: torch.nn.Module) -> list[OptimGroupOverride]:
        params = self.categorize_parameters(model)
        return [
            OptimGroupOverride(params=params["matrix"], opts={"algorithm": "mano"}),
            OptimGroupOverride(params=params["vector"], opts={"algorithm": "adamw"}),
            OptimGroupOverride(params=params["embed"],
                               opts={"algorithm": "adamw", "weight_decay": self.embedding_weight_decay}),
            OptimGroupOverride(params=params["lm_head"], opts={"algorithm": "adamw"}),
        ]

    def build_groups(self, model: torch.nn.Module, strict: bool = True) -> list[dict[str, Any]]:
        """The Mano/AdamW groups, with ``param_names`` (Mano's error messages use them). Unlike
        ``MatrixAwareOptimConfig.build_groups`` this does not store the overrides on the config,
        so one config can build several optimizers."""
        if self.group_overrides is not None:
            raise ValueError("ManoConfig routes by OLMo-core's categorize_parameters; group_overrides "
                             "are not supported (set weight decays with the config's fields)")
        all_params: dict[str, torch.Tensor] = OrderedDict(
            (n, p) for n, p in model.named_parameters() if p.requires_grad)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        groups = []
        for index, override in enumerate(self.default_group_overrides(model)):
            names = self._expand_param_globs(override, all_params, frozen, index, strict=strict).params
            if names:
                groups.append({"params": [all_params[n] for n in names], "param_names": names, **override.opts})
        return groups

    def create_optimizer(self, model: torch.nn.Module, strict: bool = True, **kwargs: Any) -> Mano:
        betas = kwargs.pop("betas")
        kwargs.pop("embedding_weight_decay")
        return Mano(self.build_groups(model, strict=strict), adamw_betas=tuple(betas), **kwargs)
