"""Momo: model-based momentum step sizes (Schaipp et al., "MoMo: Momentum Models for Adaptive
Learning Rates"), generalised to non-Euclidean directions as in arXiv 2510.09827, around Mano,
Muon and MuonMax.

Momo keeps exponential averages (factor ``beta``, zero start, bias-corrected by 1 - beta^k) of
the loss f, of the gradient d and of <g, x>, which define a model of the loss along the base
optimizer's direction D (the step the base optimizer would take at lr 1, decoupled weight decay
included). With x the params before the step:

    h   = f_avg + <d, x> - <g, x>_avg           (the model's value at x)
    tau = min(lr, max(h - f_star, 0) / <d, D>)  (Polyak-type step towards the lower bound f_star)
    x  <- x - tau D

For MuonMax, <d, D> is the squared dual norm s N^2 + sum m^2 / (eps + sqrt v) of the paper (with
the base's own momentum); here d is Momo's own gradient average, the same for every base, so
Momo-Mano, Momo-Muon and Momo-MuonMax differ only in D. ``lr`` (per group, so schedulers work)
caps the step; ``f_star`` defaults to 0, a lower bound of cross-entropy.

Cost: one extra buffer per param (d) and, during ``step()``, a copy of the params (to read D
off the base step). Distributed: the four global numbers (mean loss, <d, x>, <g, x>, <d, D>) ride
one all-reduce of 4 float64 per step; each rank's local sums are weighted by 1 / (ranks holding
the same elements), so replicated params (HSDP, plain tensors) are not counted twice. The four
are built on the params' device (NCCL all-reduces only accelerator tensors) and read on the host
once, after the all-reduce: the Polyak step is a host number (it is min'ed with each group's lr
and kept in ``param_groups`` for checkpoints). With Mano's non-finite check, that is a second read.

Usage: ``opt.step(loss=loss.detach())`` after ``backward()``, or ``opt.step(closure)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..dtensors import global_sums, local, sum_device, weighted_dot

MOMO_GROUP_KEYS = ("momo_loss_avg", "momo_gx_avg", "momo_steps")


class MomoMixin:
    """Put before an optimizer class: ``class MomoMano(MomoMixin, Mano)``."""

    def __init__(self, *args, momo_beta: float = 0.9, f_star: float = 0.0, process_group=None, **kwargs):
        if not 0.0 <= momo_beta < 1.0:
            raise ValueError(f"Invalid momo_beta: {momo_beta}")
        self.momo_beta, self.f_star = momo_beta, float(f_star)
        self._momo_group = process_group
        super().__init__(*args, **kwargs)
        if process_group is not None and hasattr(self, "process_group"):
            self.process_group = process_group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first = self.param_groups[0]
        for key in MOMO_GROUP_KEYS:  # the global averages, kept alike in every group
            group.setdefault(key, first.get(key, 0.0))
        for p in group["params"]:
            self.state[p].setdefault("momo_d", torch.zeros_like(p))

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError(f"{type(self).__name__} needs the loss: optimizer.step(loss=loss) or step(closure)")
        if getattr(self, "nonfinite", "ignore") != "ignore" and not self._gradients_finite():
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss
        beta = self.momo_beta
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = sum_device(params, self._momo_group)
        ds = [self.state[p]["momo_d"] for p in params]
        for p, d in zip(params, ds):
            local(d).lerp_(local(p.grad), 1 - beta)
        # Before the base step (Mano's Nesterov writes into the gradients): <g, x>, <d, x>.
        gx, dx = weighted_dot([(p.grad, p) for p in params], device), weighted_dot(list(zip(ds, params)), device)
        x_old = [local(p).clone() for p in params]
        self._base_step_at_lr_one()
        directions = [x.sub_(local(p)) for p, x in zip(params, x_old)]  # D = x_old - x_new, in the copies
        dD = weighted_dot(list(zip(ds, directions)), device)  # d is laid out like p: its replication
        world = dist.get_world_size(self._momo_group) if dist.is_available() and dist.is_initialized() else 1
        sums = global_sums(torch.stack([_loss_sum(loss, device) / world, gx, dx, dD]), self._momo_group)
        loss_mean, gx, dx, dD = sums.tolist()  # the step's one host read of Momo's own

        first = self.param_groups[0]
        k = first["momo_steps"] + 1
        loss_avg = beta * first["momo_loss_avg"] + (1 - beta) * loss_mean
        gx_avg = beta * first["momo_gx_avg"] + (1 - beta) * gx
        correction = 1 - beta**k
        h = (loss_avg + dx - gx_avg) / correction
        slope = dD / correction
        for group in self.param_groups:
            group.update(momo_steps=k, momo_loss_avg=loss_avg, momo_gx_avg=gx_avg)
        # The model-based step, once for all params (inf when the slope is unusable: tau = lr).
        polyak = max(h - self.f_star, 0.0) / slope if slope > 0 and math.isfinite(slope) else math.inf
        self.last_momo = {"h": h, "slope": slope, "polyak_step": polyak}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, D in zip(params, directions):
            tau = min(group_of[p]["lr"], polyak)
            local(p).add_(D, alpha=1.0 - tau)  # x_new = x_old - D  ->  x_old - tau D
        return loss

    def _base_step_at_lr_one(self) -> None:
        """The base optimizer's step at lr 1 (its direction D); the non-finite check was made
        collectively before, so the base must not repeat it."""
        lrs = [g["lr"] for g in self.param_groups]
        policy = getattr(self, "nonfinite", None)
        try:
            for g in self.param_groups:
                g["lr"] = 1.0
            if policy is not None:
                self.nonfinite = "ignore"
            super().step()
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
            if policy is not None:
                self.nonfinite = policy


def _loss_sum(loss, device: torch.device) -> torch.Tensor:
    """The step's loss as a float64 0-d tensor on ``device``, read on the host only with the
    other sums (a device loss's mean stays on the device)."""
    if torch.is_tensor(loss):
        return loss.detach().double().mean().to(device)
    return torch.tensor(float(loss), dtype=torch.float64, device=device)
