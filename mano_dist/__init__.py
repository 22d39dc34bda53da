"""mano_dist: the Mano optimizer, sharded (FSDP2, HSDP, tensor parallel, DeepSpeed ZeRO)."""

from .optimizer import Mano
from .comm import CollectiveCounter
from .param_groups import classify_parameters, mano_param_groups

__all__ = ["Mano", "mano_param_groups", "classify_parameters", "CollectiveCounter"]
__version__ = "0.1.0"
