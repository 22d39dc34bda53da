r"""Mano in torchtitan (tested with torchtitan 0.3.0): an ``OptimizersContainer`` that knows "Mano".

torchtitan builds its optimizer from ``OptimizersContainer.Config(param_groups=[ParamGroupConfig(
pattern, optimizer_name, optimizer_kwargs), ...])`` and resolves ``optimizer_name`` through a
hard-coded table (Adam, AdamW, DistMuon). :class:`ManoOptimizersContainer` is the documented
extension point (a subclass): it adds ``"Mano"`` to that table. Every param group named
``"Mano"`` goes into one :class:`mano_dist.Mano`, so the AdamW fallback is Mano's own
``"algorithm": "adamw"`` groups in the same optimizer (one step, one checkpoint entry).

torchtitan builds the optimizer *after* parallelising the model, so Mano receives the FSDP2 (and
TP) DTensors directly and steps them sharded.

Fused QKV. torchtitan's LLaMA projects Q, K and V with one ``attention.qkv_linear.wqkv`` Linear
(``FusedQKVLinear``). Its rows are **grouped by KV head**, not stacked Q-then-K-then-V: viewed
as ``[n_kv_heads, heads_per_kv + 2, head_dim, dim]``, group g holds ``heads_per_kv * head_dim``
rows of Q (the query heads that share KV head g), then ``head_dim`` rows of K_g, then
``head_dim`` rows of V_g (``FusedQKVLinear.forward`` and its ``_split_qkv_on_save``). The
``"splits"`` that :func:`fused_qkv_row_splits` returns follow that layout, so every such row
block steps as its own matrix: each KV group's query block, each K head and each V head. Mano's
``"splits"`` are contiguous row blocks, so the whole Q (all groups together) cannot be one
matrix; with ``n_kv_heads == 1`` the blocks are exactly Q, K and V.

Usage in a torchtitan config function (``--module ... --config ...``)::

    from mano_dist.integrations.torchtitan import mano_optimizer_config
    config = llama3_debugmodel()
    config.optimizer = mano_optimizer_config(config.model_spec.model, lr=1e-3, weight_decay=0.1)

See ``mano_dist/integrations/torchtitan_configs.py`` and docs/integrations.md.

This module imports torchtitan; ``import mano_dist`` and ``import mano_dist.integrations`` do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optimizer import Mano

__all__ = [
    "ManoOptimizersContainer",
    "fused_qkv_row_splits",
    "fused_qkv_row_blocks",
    "llama_param_group_configs",
    "mano_optimizer_config",
    "ADAMW_PATTERN",
    "WQKV_PATTERN",
    "mano_state_is_sharded",
]

#: Names torchtitan's LLaMA keeps off Mano: the embedding, the output head, every norm gain and
#: every bias (searched in the param's name, which may contain wrapper segments such as
#: ``_checkpoint_wrapped_module``).
ADAMW_PATTERN = r"(^|\.)(tok_embeddings|lm_head)\.|norm\.weight$|\.bias$"
#: The fused QKV projection of ``FusedQKVLinear``.
WQKV_PATTERN = r"(^|\.)qkv_linear\.wqkv\.weight$"
#: Every other weight of a transformer block (attention ``wo``, separate ``wq``/``wk``/``wv``,
#: ``feed_forward.w1/w2/w3``) is a hidden matrix.
HIDDEN_PATTERN = r"(^|\.)layers\.\d+\..*\.weight$"

_IMPL_KEYS = ("fused", "foreach")  # torchtitan's torch.optim implementation switches


def fused_qkv_row_splits(n_heads: int, n_kv_heads: int | None, head_dim: int) -> tuple[int, ...]:
    """Row counts of torchtitan's fused ``wqkv`` in order: for each of the ``n_kv_heads`` KV
    groups, ``heads_per_kv * head_dim`` query rows, ``head_dim`` key rows, ``head_dim`` value rows
    (the layout of ``FusedQKVLinear``; see the module docstring)."""
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv}) for a fused QKV")
    return ((n_heads // n_kv) * head_dim, head_dim, head_dim) * n_kv


def fused_qkv_row_blocks(n_heads: int, n_kv_heads: int | None, head_dim: int) -> list[tuple[str, int, slice]]:
    """``[(kind, kv_group, rows), ...]`` for the blocks of :func:`fused_qkv_row_splits`, kind one of
    ``"q"``, ``"k"``, ``"v"``: which rows of ``wqkv`` are which projection (for tests and logs)."""
    out, start = [], 0
    for i, count in enumerate(fused_qkv_row_splits(n_heads, n_kv_heads, head_dim)):
        out.append(("qkv"[i % 3], i // 3, slice(start, start + count)))
        start += count
    return out


def _module_qkv_splits(module: nn.Module) -> tuple[int, ...]:
    """The splits of a built ``FusedQKVLinear`` (from its own head_dim / heads_per_kv and its
    weight's global shape, so TP/FSDP sharding does not matter)."""
    rows = module.wqkv.weight.shape[0]
    n_kv = rows // (module.r_dim * module.head_dim)
    return fused_qkv_row_splits(n_kv * module.heads_per_kv, n_kv, module.head_dim)


def _config_qkv_splits(model_config: Any) -> list[tuple[int, ...]]:
    """The fused-QKV splits of every layer of a torchtitan decoder config (``None`` for a layer
    whose attention is not fused)."""
    from torchtitan.models.common.attention import FusedQKVLinear

    out = []
    for layer in model_config.layers:
        attention = getattr(layer, "attention", None)
        qkv = getattr(attention, "qkv_linear", None)
        if attention is None or not isinstance(qkv, FusedQKVLinear.Config):
            out.append(None)
            continue
        out.append(fused_qkv_row_splits(qkv.n_heads, qkv.n_kv_heads, qkv.head_dim))
    return out


def llama_param_group_configs(
    model_config: Any,
    *,
    lr: float,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    mano_kwargs: dict[str, Any] | None = None,
    adamw_kwargs: dict[str, Any] | None = None,
) -> list[ParamGroupConfig]:
    """torchtitan ``ParamGroupConfig``\\ s for Mano on a LLaMA-style decoder config
    (``Llama3Model.Config``; any ``Decoder.Config`` with the same names works).

    In order (torchtitan: first match wins): embedding, head, norms and biases ->
    ``"algorithm": "adamw"``; each fused ``wqkv`` -> Mano with ``"splits"`` from the layer's
    head counts (:func:`fused_qkv_row_splits`); every other block weight -> Mano. All groups are
    named ``"Mano"``, so they share one optimizer. ``mano_kwargs`` / ``adamw_kwargs`` add group
    options (``momentum``, ``variant``, ``adamw_betas``, ...).
    """
    adamw = {"algorithm": "adamw", "lr": lr if adamw_lr is None else adamw_lr,
             "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
             **(adamw_kwargs or {})}
    mano = {"algorithm": "mano", "lr": lr, "weight_decay": weight_decay, **(mano_kwargs or {})}
    configs = [ParamGroupConfig(pattern=ADAMW_PATTERN, optimizer_name="Mano", optimizer_kwargs=adamw)]
    splits = _config_qkv_splits(model_config)
    distinct = sorted({s for s in splits if s is not None})
    for split in distinct:
        if len(distinct) == 1:
            pattern = WQKV_PATTERN
        else:  # layers with different head counts: one group per distinct split
            layers = "|".join(str(i) for i, s in enumerate(splits) if s == split)
            pattern = rf"(^|\.)layers\.({layers})\.(.*\.)?qkv_linear\.wqkv\.weight$"
        configs.append(ParamGroupConfig(pattern=pattern, optimizer_name="Mano",
                                        optimizer_kwargs={**mano, "splits": split}))
    configs.append(ParamGroupConfig(pattern=HIDDEN_PATTERN, optimizer_name="Mano", optimizer_kwargs=dict(mano)))
    return configs


def mano_optimizer_config(
    model_config: Any,
    *,
    lr: float,
    weight_decay: float = 0.1,
    variant: str = "v2",
    momentum: float = 0.95,
    nesterov: bool = True,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    nonfinite: str = "skip",
    fused: bool | None = None,
) -> "ManoOptimizersContainer.Config":
    """The ``optimizer`` of a torchtitan ``Trainer.Config``: :class:`ManoOptimizersContainer`
    with :func:`llama_param_group_configs`. ``variant``/``momentum``/``nesterov``/``adamw_*``
    are :class:`mano_dist.Mano`'s; ``nonfinite`` and ``fused`` (Mano's compiled step) go to its
    constructor via torchtitan's ``optimizer_factory_kwargs_by_name``."""
    group = {"variant": variant, "momentum": momentum, "nesterov": nesterov,
             "adamw_betas": tuple(adamw_betas), "adamw_eps": adamw_eps}
    return ManoOptimizersContainer.Config(
        param_groups=llama_param_group_configs(model_config, lr=lr, weight_decay=weight_decay, adamw_lr=adamw_lr,
                                               adamw_weight_decay=adamw_weight_decay, mano_kwargs=group,
                                               adamw_kwargs=group),
        optimizer_factory_kwargs_by_name={"Mano": {"nonfinite": nonfinite, "fused": fused}},
    )


def _build_mano(param_groups: list[dict[str, Any]], **kwargs: Any) -> Mano:
    """torchtitan's factory call ``factory(groups, **optimizer_factory_kwargs_by_name["Mano"])``.
    torchtitan adds its ``implementation`` switches (``fused``/``foreach``, meant for
    torch.optim's CUDA kernels) to every group; Mano's ``fused`` is a constructor option, so
    they are dropped here. ``"splits"`` arrive as lists from a config file: made tuples."""
    groups = []
    for group in param_groups:
        group = {k: v for k, v in group.items() if k not in _IMPL_KEYS}
        if group.get("splits") is not None:
            group["splits"] = tuple(group["splits"])
        groups.append(group)
    return Mano(groups, **kwargs)


class ManoOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with ``"Mano"`` as an ``optimizer_name``.

    Everything else is torchtitan's: pattern routing (first match wins), one optimizer per
    name and model part, the flat FQN-keyed ``state_dict`` its checkpointer saves with DCP,
    the LR schedulers. Mano creates its state at construction, so torchtitan's
    ``init_optim_state`` (a zero-lr step) never runs for it.

    At construction every ``FusedQKVLinear.wqkv`` weight in a Mano group is checked: it must be
    on ``"algorithm": "mano"`` with the ``"splits"`` of its own module (a wrong or missing split
    would silently mix Q, K and V statistics), else ``ValueError``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name == "Mano":
            return _build_mano
        return OptimizersContainer._resolve_optimizer_factory(name)

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        self._check_fused_qkv()

    def _check_fused_qkv(self) -> None:
        from torchtitan.models.common.attention import FusedQKVLinear

        expected: dict[int, tuple[str, tuple[int, ...]]] = {}
        for model in self.model_parts:
            for name, module in model.named_modules():
                if isinstance(module, FusedQKVLinear):
                    expected[id(module.wqkv.weight)] = (f"{name}.wqkv.weight", _module_qkv_splits(module))
        for optimizer in self.optimizers:
            if not isinstance(optimizer, Mano):
                continue
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in expected:
                        continue
                    name, splits = expected[id(p)]
                    got = group.get("splits") if group["algorithm"] == "mano" else "AdamW"
                    if got != splits:
                        raise ValueError(
                            f"{name} stacks Q, K and V rows grouped by KV head; its Mano group needs "
                            f'"splits": {splits} (fused_qkv_row_splits), got {got!r}. '
                            "llama_param_group_configs(model_config, ...) sets them.")


def mano_state_is_sharded(container: OptimizersContainer) -> bool:
    """Whether every Mano state tensor of ``container`` with a shape is a DTensor (a shard)."""
    return all(hasattr(t, "to_local") for opt in container.optimizers if isinstance(opt, Mano)
               for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.ndim)
