"""Build a :class:`DeepSpeedMano` from the JSON config's ``"params"`` and the engine's module.

DeepSpeed would call ``Mano(model_parameters, **params)``, which cannot tell embeddings and the
output head from hidden matrices (they are all 2-D). We see the module, so the routing of
:func:`mano_dist.param_groups.classify_parameters` applies even to a bare ``model.parameters()``.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from torch import nn

from ..optimizer import Mano
from ..param_groups import classify_parameters, split_by_rows
from .optimizer import DeepSpeedMano

_ROUTING_KEYS = ("adamw_patterns", "mano_patterns", "splits")  # splits: {name regex: row counts}
MANO_CONFIG_KEYS = tuple(
    name for name in inspect.signature(Mano.__init__).parameters
    if name not in ("self", "params", "mano_params", "adamw_params", "process_group")
) + ("fused_cpu",) + _ROUTING_KEYS  # fused_cpu: DeepSpeedMano's own (ZeRO-Offload)


def check_config_params(params: dict[str, Any]) -> None:
    """A ValueError naming every unknown key, before anything is built or communicated."""
    unknown = sorted(set(params) - set(MANO_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f'Unknown key(s) {", ".join(repr(k) for k in unknown)} in "optimizer": {{"type": "Mano", '
            f'"params": ...}} of the DeepSpeed config; valid keys: {", ".join(MANO_CONFIG_KEYS)}. '
            'Gradient clipping is the top-level "gradient_clipping".'
        )


def _matrix_ndim(p) -> int:
    return len(getattr(p, "ds_shape", p.shape))


def route_parameters(module: nn.Module, model_parameters: Iterable, *, adamw_patterns=(),
                     mano_patterns=(), splits=None) -> list[dict[str, Any]]:
    """Split what the user passed into Mano/AdamW param groups (user groups keep their options;
    ``splits`` as in :func:`mano_dist.mano_param_groups`, one Mano group per distinct split)."""
    if splits is not None and not isinstance(splits, dict):
        raise ValueError(f'"splits" in the DeepSpeed config\'s Mano params is {{"name regex": [row counts]}}, '
                         f"got {splits!r}")
    items = list(model_parameters) if model_parameters is not None else list(module.parameters())
    if items and all(isinstance(g, dict) for g in items):
        user_groups = items
    else:
        user_groups = [{"params": items}]
    mano, adamw = classify_parameters(module, adamw_patterns, mano_patterns)
    names = {id(p): n for n, p in mano + adamw}
    rows_of = {id(p): rows for rows, named in split_by_rows(mano, splits, adamw) for _, p in named}
    to_mano = {id(p) for _, p in mano}
    groups = []
    for user_group in user_groups:
        options = {k: v for k, v in user_group.items() if k not in ("params", "param_names")}
        params = [p for p in user_group["params"] if p.requires_grad]
        if "algorithm" in options:
            split = {options.pop("algorithm"): params}
        else:
            split = {"mano": [], "adamw": []}
            for p in params:
                is_mano = id(p) in to_mano if id(p) in names else _matrix_ndim(p) >= 2
                split["mano" if is_mano else "adamw"].append(p)
        for algorithm, ps in split.items():
            by_rows: dict[Any, list] = {}
            for p in ps:
                by_rows.setdefault(rows_of.get(id(p)) if algorithm == "mano" else None, []).append(p)
            for rows, members in by_rows.items():
                groups.append({"params": members, "param_names": [names.get(id(p), "") for p in members],
                               "algorithm": algorithm, **options, **({"splits": rows} if rows else {})})
    return groups


def build_optimizer(module: nn.Module, model_parameters, params: dict[str, Any] | None) -> DeepSpeedMano:
    """What the engine builds for ``"type": "Mano"``."""
    params = dict(params or {})
    check_config_params(params)
    routing = {k: params.pop(k) for k in _ROUTING_KEYS if k in params}
    if "adamw_betas" in params:
        params["adamw_betas"] = tuple(params["adamw_betas"])
    optimizer = DeepSpeedMano(route_parameters(module, model_parameters, **routing), **params)
    optimizer._engine_building = True  # the engine hook clears it after attach()
    return optimizer
