"""Baselines under Mano's interface: torch's Muon with the AdamW fallback, MuonMax, and Momo
step sizes around Mano, Muon and MuonMax; ``build_optimizer(name, model, ...)`` selects by name."""

from .factory import NAMES, MomoMano, MomoMuon, MomoMuonMax, build_optimizer, needs_loss
from .momo import MomoMixin
from .muon import MuonAdamW
from .muonmax import MuonMax
from .polar import newton_schulz

__all__ = ["NAMES", "build_optimizer", "needs_loss", "MuonAdamW", "MuonMax", "MomoMixin", "MomoMano",
           "MomoMuon", "MomoMuonMax", "newton_schulz"]
