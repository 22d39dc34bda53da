"""The prepared-folder contract, shared by its writer (``prepare``) and its reader (``loader``):
the format version, the token dtype for a vocabulary, the manifest's name, the writer's error.

A prepared folder holds ``shards/NNNNNN.{train,val}.bin`` (tokens), ``.ends`` (document end
offsets, uint64), the tokenizer and ``manifest.json``; see ``prepare`` for how it is written.
"""

from __future__ import annotations

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PrepareError(ValueError):
    """Bad options or inputs for a preparation."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 tokens while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
