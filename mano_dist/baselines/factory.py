"""Optimizers by name, with the same parameter routing for all of them.

``build_optimizer(name, model, lr=..., weight_decay=..., momentum=..., nesterov=...,
variant=..., adamw_betas=..., adamw_eps=..., adamw_lr=None, momo_beta=0.9, f_star=0.0)``

Names: ``mano``, ``adamw``, ``muon``, ``muonmax``, ``momo-mano``, ``momo-muon``,
``momo-muonmax``. Every matrix optimizer gets the hidden matrices of ``mano_param_groups(model)``;
embeddings, the output head and 1-D params go to AdamW (``adamw_lr`` overrides their lr). Momo
variants need ``step(loss=...)``. Unused keywords are ignored per optimizer (``variant`` matters
only to Mano), so one recipe config drives them all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..optimizer import Mano
from ..param_groups import mano_param_groups
from .momo import MomoMixin
from .muonmax import MuonMax
from .requirements import MUON_NAMES, missing_requirement

NAMES = ("mano", "adamw", "muon", "muonmax", "momo-mano", "momo-muon", "momo-muonmax")


class MomoMano(MomoMixin, Mano):
    """Momo step sizes along Mano's direction."""


class MomoMuonMax(MomoMixin, MuonMax):
    """Momo step sizes along MuonMax's direction (the paper's recommendation)."""


def _groups(model: nn.Module, matrix_algorithm: str, adamw_lr: float | None) -> list[dict[str, Any]]:
    groups = mano_param_groups(model, adamw_options={"lr": adamw_lr} if adamw_lr is not None else None)
    out = []
    for g in groups:
        g = dict(g)
        if g.get("algorithm") == "mano":
            g["algorithm"] = matrix_algorithm
        g.pop("param_names", None)
        out.append(g)
    return [g for g in out if g["params"]]


def build_optimizer(name: str, model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.1,
                    momentum: float = 0.95, nesterov: bool = True, variant: str = "v2",
                    adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8, adamw_lr: float | None = None,
                    momo_beta: float = 0.9, f_star: float = 0.0) -> torch.optim.Optimizer:
    if name not in NAMES:
        raise ValueError(f"Unknown optimizer {name!r} (one of {', '.join(NAMES)})")
    momo = dict(momo_beta=momo_beta, f_star=f_star)
    if name == "adamw":
        groups = [{"params": g["params"], **({"lr": g["lr"]} if "lr" in g else {})}
                  for g in _groups(model, "mano", adamw_lr)]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=weight_decay)
    if name in ("mano", "momo-mano"):
        cls, extra = (Mano, {}) if name == "mano" else (MomoMano, momo)
        return cls(_groups(model, "mano", adamw_lr), lr=lr, momentum=momentum, nesterov=nesterov,
                   weight_decay=weight_decay, variant=variant, adamw_betas=adamw_betas, adamw_eps=adamw_eps, **extra)
    if missing_requirement(name):
        raise ImportError(missing_requirement(name))
    if name in MUON_NAMES:
        from .muon import MomoMuon, MuonAdamW  # imported when used: torch.optim.Muon needs torch >= 2.9

        cls, extra = (MuonAdamW, {}) if name == "muon" else (MomoMuon, momo)
        return cls(_groups(model, "muon", adamw_lr), lr=lr, weight_decay=weight_decay, momentum=momentum,
                   nesterov=nesterov, adamw_betas=adamw_betas, adamw_eps=adamw_eps, **extra)
    cls, extra = (MuonMax, {}) if name == "muonmax" else (MomoMuonMax, momo)
    return cls(_groups(model, "muonmax", adamw_lr), lr=lr, momentum=momentum, weight_decay=weight_decay,
               adamw_betas=adamw_betas, adamw_eps=adamw_eps, **extra)


def needs_loss(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``step`` must be given the loss (the Momo variants)."""
    return isinstance(optimizer, MomoMixin)
