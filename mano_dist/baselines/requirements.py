"""What each baseline needs beyond the declared torch floor, checked before anything is built."""

from __future__ import annotations

import torch

MUON_NAMES = ("muon", "momo-muon")


def missing_requirement(name: str) -> str | None:
    """Why optimizer ``name`` cannot run on this torch, or None. ``torch.optim.Muon`` came in torch 2.9."""
    if name in MUON_NAMES and not hasattr(torch.optim, "Muon"):
        return f"{name!r} subclasses torch.optim.Muon, which needs torch >= 2.9 (this is torch {torch.__version__})"
    return None
