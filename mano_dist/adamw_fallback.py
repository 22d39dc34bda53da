"""The AdamW fallback that Mano and every baseline run on their ``"adamw"`` groups (embeddings,
head, norms): one state layout and one call, so the optimizers compared in a study cannot
drift apart in the part they share.

The step counter is a 0-d float32 tensor on the param's device (torch's own ``capturable``
convention), so counting steps never reads anything back to the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dtensors import local
from .functional import adamw_step


def adamw_state(p: Tensor) -> dict[str, Tensor]:
    """Fresh AdamW state shaped like ``p`` (a DTensor param gets DTensor state)."""
    return {
        "step": torch.zeros((), dtype=torch.float32, device=p.device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def momentum_state(p: Tensor) -> dict[str, Tensor]:
    """A matrix algorithm's one buffer (Mano, Muon, MuonMax)."""
    return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}


def adamw_tensors(params: list[Tensor], states: list[dict]) -> tuple[list[Tensor], ...]:
    """(params, grads, exp_avgs, exp_avg_sqs, steps) as local shards: the arguments of
    :func:`mano_dist.functional.adamw_step` and of the fused AdamW segment."""
    return ([local(p) for p in params], [local(p.grad) for p in params],
            [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states])


def adamw_hyper(group: dict[str, Any]) -> dict[str, float]:
    beta1, beta2 = group["adamw_betas"]
    return dict(beta1=beta1, beta2=beta2, eps=group["adamw_eps"], weight_decay=group["weight_decay"])


def adamw_group_step(group: dict[str, Any], state: dict, *, lr=None, skip: Tensor | None = None) -> None:
    """One eager AdamW step of ``group``'s params that have gradients (``lr`` defaults to the
    group's; ``skip``: a device flag that leaves everything untouched when set)."""
    params = [p for p in group["params"] if p.grad is not None]
    if params:
        adamw_step(*adamw_tensors(params, [state[p] for p in params]), lr=group["lr"] if lr is None else lr,
                   skip=skip, **adamw_hyper(group))
