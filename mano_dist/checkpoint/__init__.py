"""Sharded checkpoints for Mano runs: the :class:`Checkpointer` (DCP, async, crash-safe, keeps
the last K, exact resume) and a converter to one consolidated file (``mano-consolidate``)."""

from .checkpointer import Checkpointer
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
)


def consolidate(path, out, model_only: bool = False):
    """See :func:`mano_dist.checkpoint.convert.consolidate` (imported lazily so that
    ``python -m mano_dist.checkpoint.convert`` runs without a double-import warning)."""
    from .convert import consolidate as _consolidate

    return _consolidate(path, out, model_only=model_only)


__all__ = [
    "Checkpointer",
    "consolidate",
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
]
