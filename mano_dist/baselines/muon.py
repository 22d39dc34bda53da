"""``torch.optim.Muon`` with the same AdamW fallback as Mano, as one optimizer.

``torch.optim.Muon`` accepts only 2-D params, so models need a second optimizer for embeddings,
the head and 1-D params; this subclass runs torch's own Muon step on the ``"muon"`` groups and
Mano's AdamW rule on the ``"adamw"`` groups, so one object serves LR schedulers, checkpoints
and the recipes. Under FSDP2, torch's Muon lets DTensor gather each matrix for Newton-Schulz
(the communication the benchmarks compare against). State is created eagerly.

``torch.optim.Muon`` exists from torch 2.9 on; the package imports this module only when a Muon
optimizer is built, so everything else works on the older torch that ``pyproject.toml`` allows.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from ..adamw_fallback import adamw_group_step
from .momo import MomoMixin
from .requirements import missing_requirement
from .state import init_param_state

if missing_requirement("muon"):
    raise ImportError(f"{missing_requirement('muon')}; Mano, AdamW and MuonMax work without it")


class MuonAdamW(torch.optim.Muon):
    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8,
                 adjust_lr_fn: str | None = "match_rms_adamw", ns_steps: int = 5):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        algorithm="muon", step=0)
        Optimizer.__init__(self, params, defaults)  # torch's Muon.__init__ rejects non-2-D params

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["algorithm"] not in ("muon", "adamw"):
            raise ValueError(f"Invalid algorithm: {group['algorithm']!r} (muon or adamw)")
        for i, p in enumerate(group["params"]):
            init_param_state(self.state[p], p, i, matrix=group["algorithm"] == "muon",
                             requirement="Muon updates 2-D matrices", ok=p.ndim == 2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        try:  # torch's Muon step over the Muon groups only
            self.param_groups = [g for g in groups if g["algorithm"] == "muon"]
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group["algorithm"] == "adamw":
                adamw_group_step(group, self.state)
            group["step"] += 1
        return loss


class MomoMuon(MomoMixin, MuonAdamW):
    """Momo step sizes along Muon's direction."""
