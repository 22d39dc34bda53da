"""Baselines under Mano's interface: torch's Muon with the AdamW fallback, MuonMax, and Momo
step sizes around Mano, Muon and MuonMax; ``build_optimizer(name, model, ...)`` selects by name."""

from .factory import NAMES, MomoMano, MomoMuonMax, build_optimizer, needs_loss
from .momo import MomoMixin
from .muonmax import MuonMax
from .polar import newton_schulz
from .requirements import missing_requirement

__all__ = ["NAMES", "build_optimizer", "needs_loss", "MuonAdamW", "MuonMax", "MomoMixin", "MomoMano",
           "MomoMuon", "MomoMuonMax", "newton_schulz", "missing_requirement"]


def __getattr__(name: str):
    """``MuonAdamW`` and ``MomoMuon`` subclass ``torch.optim.Muon`` (torch >= 2.9): imported on first use."""
    if name in ("MuonAdamW", "MomoMuon"):
        from . import muon

        return getattr(muon, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
