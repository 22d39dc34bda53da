"""MuonMax (Gower et al., "An Exploration of Non-Euclidean Gradient Descent", arXiv 2510.09827).

Steepest descent when the layers' norms are aggregated by their *max* (spectral norm for hidden
matrices, AdamW's preconditioned norm for the rest). The un-normalised step along the polar
factor is then scaled by the dual norm, the sum over matrices of the nuclear norms, a
cross-layer scalar. As implemented (``../shared/notes/algorithm.md``), per optimizer step t:

    matrices l:  M_l <- b M_l + (1 - b) G_l                     (EMA momentum)
                 P_l  = polar(M_l)                              (Newton-Schulz, 5 steps)
                 N    = sum_l <M_l, P_l>                        (~ sum of nuclear norms)
                 W_l <- (1 - lr wd) W_l - lr s N P_l
    the rest:    AdamW (bias-corrected m / (eps + sqrt v)), the same rule as Mano's fallback.

Defaults b = 0.95, s = 10. Choices where the summary is silent: N uses the Newton-Schulz P
(not an exact SVD), so it is the nuclear norm up to Newton-Schulz's singular-value spread; the
AdamW part is not scaled by N (the summary's "AdamW-like rule for the rest").

Under FSDP2 each matrix's momentum is gathered whole (``full_tensor``) to orthogonalise it, as
Muon must; every rank then holds the same full M_l and P_l, so N needs no further collective,
and each rank keeps its own shard of P_l. N is a float64 tensor on the params' device that
scales the update there: the step reads nothing back to the host (``_last_nuclear`` holds it).
``Momo`` (``momo.py``) wraps this optimizer too.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..adamw_fallback import adamw_group_step
from ..dtensors import full, local, local_part, sum_device
from .polar import newton_schulz
from .state import init_param_state

ALGORITHMS = ("muonmax", "adamw")


def _check(group: dict[str, Any]) -> None:
    checks = [
        ("lr", 0.0 <= group["lr"]),
        ("momentum", 0.0 <= group["momentum"] < 1.0),
        ("scale", 0.0 < group["scale"]),
        ("weight_decay", 0.0 <= group["weight_decay"]),
        ("adamw_eps", 0.0 < group["adamw_eps"]),
        ("ns_steps", int(group["ns_steps"]) >= 1),
        ("adamw_betas", len(group["adamw_betas"]) == 2 and all(0.0 <= b < 1.0 for b in group["adamw_betas"])),
        ("algorithm", group["algorithm"] in ALGORITHMS),
    ]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"Invalid {name}: {group[name]!r}")


class MuonMax(Optimizer):
    """MuonMax for hidden matrices (groups with ``"algorithm": "muonmax"``, the default) and
    AdamW for the rest (``"algorithm": "adamw"``); see the module docstring for the rule."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.95, scale: float = 10.0,
                 weight_decay: float = 0.1, adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, scale=scale, weight_decay=weight_decay,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, ns_steps=ns_steps,
                        algorithm="muonmax", step=0)
        _check(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["adamw_betas"] = tuple(group["adamw_betas"])
        _check(group)
        for i, p in enumerate(group["params"]):
            init_param_state(self.state[p], p, i, matrix=group["algorithm"] == "muonmax",
                             requirement="MuonMax orthogonalises matrices", ok=p.ndim >= 2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        polar, nuclear = self._polar_factors()
        for group in self.param_groups:
            if group["algorithm"] == "muonmax":
                self._muonmax_update(group, polar, nuclear)
            else:
                adamw_group_step(group, self.state)
            group["step"] += 1
        self._last_nuclear = nuclear
        return loss

    def _polar_factors(self) -> tuple[dict[Tensor, Tensor], Tensor]:
        """Pass 1: momentum, polar factors (local shards kept) and the global scalar N, summed
        on the params' device (a host read per matrix would sync the GPU once per matrix)."""
        matrices = [(g, p) for g in self.param_groups if g["algorithm"] == "muonmax"
                    for p in g["params"] if p.grad is not None]
        nuclear = torch.zeros((), dtype=torch.float64, device=sum_device([p for _, p in matrices]))
        polar: dict[Tensor, Tensor] = {}
        for group, p in matrices:
            M = self.state[p]["momentum_buffer"]
            local(M).lerp_(local(p.grad), 1 - group["momentum"])
            M_full = full(M)
            P_full = newton_schulz(M_full, group["ns_steps"])
            nuclear += torch.vdot(M_full.reshape(-1).double(), P_full.reshape(-1).double()).to(nuclear.device)
            polar[p] = local_part(P_full, M)
        return polar, nuclear

    @staticmethod
    def _muonmax_update(group: dict[str, Any], polar: dict[Tensor, Tensor], nuclear: Tensor) -> None:
        """W <- (1 - lr wd) W - lr s N P, with N a device tensor (no host read)."""
        params = [p for p in group["params"] if p in polar]
        if not params:
            return
        lr = group["lr"]
        weights = [local(p) for p in params]
        torch._foreach_mul_(weights, 1 - lr * group["weight_decay"])
        steps = torch._foreach_mul([polar[p].view_as(w) for p, w in zip(params, weights)], nuclear * (-lr * group["scale"]))
        torch._foreach_add_(weights, steps)
