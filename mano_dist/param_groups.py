"""Route each parameter to Mano or to the AdamW fallback, by module type and name.

Mano is for hidden weight matrices. Embeddings and the output head are matrices too, but the
paper (and every Muon-style optimizer) keeps them on AdamW; ``p.ndim == 2`` alone cannot tell
them apart, so we look at the owning module and the name.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

HEAD_NAMES = ("lm_head", "output", "head", "classifier", "embed_out", "score")


def _head_like(module_name: str) -> bool:
    last = module_name.rsplit(".", 1)[-1]
    return last in HEAD_NAMES


def classify_parameters(
    model: nn.Module,
    adamw_patterns: Iterable[str] = (),
    mano_patterns: Iterable[str] = (),
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split ``model``'s trainable params into (mano, adamw) lists of (name, param).

    Default rule: AdamW for 0-/1-D params, every ``nn.Embedding``, a head (a module named like
    ``lm_head``/``output``/``head``, or a Linear whose weight is tied to an embedding, or whose
    ``out_features`` equals an embedding's vocabulary size); Mano for the other >= 2-D params.
    ``adamw_patterns`` / ``mano_patterns`` are regexes on full names that override the rule
    (AdamW wins if both match). Tied params appear once, under their first name.
    """
    adamw_res = [re.compile(p) for p in adamw_patterns]
    mano_res = [re.compile(p) for p in mano_patterns]
    embedding_ids = set()
    vocab_sizes = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
            vocab_sizes.add(module.num_embeddings)
    owner: dict[int, tuple[str, nn.Module]] = {}
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), (mod_name, module))

    mano, adamw, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        mod_name, module = owner.get(id(p), ("", None))
        ndim = len(getattr(p, "ds_shape", p.shape))  # deepspeed.zero.Init: shape (0,), true ds_shape
        default_adamw = (
            ndim < 2
            or id(p) in embedding_ids
            or isinstance(module, nn.Embedding)
            or _head_like(mod_name)
            or (isinstance(module, nn.Linear) and module.out_features in vocab_sizes)
        )
        if any(r.search(name) for r in adamw_res):
            to_adamw = True
        elif any(r.search(name) for r in mano_res):
            if ndim < 2:
                raise ValueError(f"mano_patterns matched '{name}' of shape {tuple(p.shape)}; Mano needs >= 2-D")
            to_adamw = False
        else:
            to_adamw = default_adamw
        (adamw if to_adamw else mano).append((name, p))
    return mano, adamw


def mano_param_groups(
    model: nn.Module,
    *,
    adamw_patterns: Iterable[str] = (),
    mano_patterns: Iterable[str] = (),
    mano_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
    splits: "Splits | None" = None,
) -> list[dict[str, Any]]:
    r"""Param groups for :class:`mano_dist.Mano`: ``[{"algorithm": "mano", ...}, {"algorithm": "adamw", ...}]``.

    ``mano_options`` / ``adamw_options`` override hyperparameters per group (e.g. a different
    lr for the AdamW params). Groups carry ``param_names`` for error messages and checkpoints.
    Empty groups are left out.

    ``splits`` declares params that stack several matrices along dim 0 (a fused QKV, a fused
    gate-up): ``{name regex: row counts}``, e.g. ``{r"attention\.wqkv": (dim, kv_dim, kv_dim)}``,
    or a function ``(name, param) -> row counts or None``. Matching Mano params go to a Mano
    group per distinct split with ``"splits"`` set, so each block steps as its own matrix.
    """
    mano, adamw = classify_parameters(model, adamw_patterns, mano_patterns)
    groups = []
    for split, named in split_by_rows(mano, splits, adamw):
        groups.append({"params": [p for _, p in named], "param_names": [n for n, _ in named], "algorithm": "mano",
                       **(mano_options or {}), **({"splits": split} if split else {})})
    if adamw:
        groups.append({"params": [p for _, p in adamw], "param_names": [n for n, _ in adamw], "algorithm": "adamw",
                       **(adamw_options or {})})
    return groups


Splits = "Mapping[str, Sequence[int]] | Callable[[str, Any], Sequence[int] | None]"


def split_by_rows(mano: list[tuple[str, Any]], splits, adamw: list[tuple[str, Any]] = ()) -> list[tuple]:
    """``mano``'s (name, param) pairs grouped by their declared row splits (see
    :func:`mano_param_groups`): ``[(None, unsplit pairs), (splits, pairs), ...]``, empty ones
    left out. Raises for a pattern that matches no param, a name matched by two patterns, and a
    split declared for a param routed to AdamW (which steps whole tensors)."""
    if splits is None:
        return [(None, mano)] if mano else []
    rule = splits if callable(splits) else _pattern_rule(splits, [n for n, _ in [*mano, *adamw]])
    stray = [name for name, p in adamw if rule(name, p) is not None]
    if stray:
        raise ValueError(f"splits: {', '.join(stray)} go to AdamW, which steps whole tensors; route them "
                         "to Mano (mano_patterns) or drop their split")
    by_split: dict[tuple | None, list] = {None: []}
    for name, p in mano:
        rows = rule(name, p)
        by_split.setdefault(tuple(rows) if rows is not None else None, []).append((name, p))
    return [(split, named) for split, named in by_split.items() if named]


def _pattern_rule(splits: Mapping[str, Sequence[int]], names: list[str]) -> Callable:
    patterns = [(re.compile(pattern), tuple(rows)) for pattern, rows in dict(splits).items()]
    unmatched = [p.pattern for p, _ in patterns if not any(p.search(n) for n in names)]
    if unmatched:
        raise ValueError(f"splits: pattern(s) {', '.join(unmatched)} match no parameter name")

    def rule(name: str, _param) -> tuple[int, ...] | None:
        hits = [(pattern, rows) for pattern, rows in patterns if pattern.search(name)]
        if len(hits) > 1:
            raise ValueError(f"splits: '{name}' matches {len(hits)} patterns "
                             f"({', '.join(h[0].pattern for h in hits)}); make them exclusive")
        return hits[0][1] if hits else None

    return rule
