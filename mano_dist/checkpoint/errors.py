"""Checkpoint errors. All derive from ``CheckpointError`` (a ``RuntimeError``) so a recipe can
catch one type; each message says what is wrong and where."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. Raised on every rank at once (decided collectively)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The folder does not exist or holds no DCP checkpoint."""


class IncompleteCheckpointError(CheckpointError):
    """The folder was never marked complete: a save was interrupted or is still running."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model or optimizer (a key or a shape differs)."""


class CorruptCheckpointError(CheckpointError):
    """A file is missing, truncated or does not match the checksum recorded at save time."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A file holds pickled objects that ``weights_only`` loading refuses (code could run if it
    were unpickled in full): planted by whoever wrote it, or written by foreign code."""
