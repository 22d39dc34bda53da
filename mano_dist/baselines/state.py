"""Eager optimizer state for the baselines: the same keys on every rank from construction on,
so DCP saves and loads them without a first step (see the Mano optimizer for the same rule)."""

from __future__ import annotations

from torch import Tensor

from ..adamw_fallback import adamw_state, momentum_state


def init_param_state(state: dict, p: Tensor, index: int, *, matrix: bool, requirement: str, ok: bool) -> None:
    """A momentum buffer for a matrix algorithm, AdamW's ``step, exp_avg, exp_avg_sq`` for the
    fallback. ``ok`` says whether ``p`` has a shape the matrix algorithm accepts; if not, the
    error says what ``requirement`` is and where such a param belongs."""
    if matrix:
        if not ok:
            raise ValueError(f"{requirement}; param {index} has shape {tuple(p.shape)}: "
                             'put it in an "adamw" group (mano_param_groups(model) does this)')
    for key, value in (momentum_state(p) if matrix else adamw_state(p)).items():
        state.setdefault(key, value)
