"""Read checkpoint files without running code they may carry.

A pickle can call any function while it is read, so a checkpoint received from someone else
could run their code. Every file this package reads goes through ``torch.load(weights_only=True)``
with a short allow-list scoped to that one call (``torch.serialization.safe_globals``; nothing
is added to the process-wide list), and DCP's own pickles (``.metadata`` and the non-tensor
items inside ``*.distcp``) are read by the reader and planner below, which refuse every global
outside the handful DCP's metadata consists of. A refused file raises
:class:`~mano_dist.checkpoint.errors.UnsafeCheckpointError` naming it; nothing of it is loaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

from .errors import CorruptCheckpointError, UnsafeCheckpointError

REFUSED = "contains objects that weights_only loading refuses"


def rng_globals() -> list:
    """What ``rng.capture()`` pickles besides tensors: numpy's MT19937 state (a uint32 array).
    Files written with numpy 1.x name the array rebuilder ``numpy.core...``; both names work."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct")]


def deepspeed_globals() -> list:
    """The classes a DeepSpeed 0.19.8 ZeRO 0-3 checkpoint of a Mano engine pickles (found by
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on fp32 and bf16 saves of stages
    0-3, JSON and client optimizers): plain-attribute objects, no custom unpickling. fp16's
    ``DynamicLossScaler`` is the same kind of object as ``LossScaler`` (fp16 does not run on
    CPU, so it is listed from the source, not from a saved file)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, error: BaseException) -> str:
    detail = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error:" in line), "")
    detail = detail.split("WeightsUnpickler error:", 1)[-1].split(". Please use")[0].strip()
    return (f"{str(path)!r} {REFUSED}" + (f" ({detail})" if detail else "") +
            "; it was not loaded. It may have been tampered with: load only checkpoints you trust")


def load(path: str | os.PathLike, allow: Iterable = (), *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` allow-listed for this call only.
    Raises UnsafeCheckpointError for a refused pickle, CorruptCheckpointError for an unreadable
    file (both naming it). ``mmap=True`` (only the pickle is read; tensor data stays on disk)
    falls back to a plain read for files in torch's legacy format."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_refusal(path, e)) from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, unreadable
        raise CorruptCheckpointError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- DCP's pickles
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses, torch dtypes and the few helpers above."""

    def find_class(self, module: str, name: str):
        if module == _METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            allowed = isinstance(obj, type) and obj.__module__ == _METADATA_MODULE
        elif module == "torch":
            allowed = name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        else:
            allowed = (module, name) in _METADATA_GLOBALS
        if not allowed:
            raise pickle.UnpicklingError(f"WeightsUnpickler error: global {module}.{name} is not allowed")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose ``.metadata`` is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_refusal(path, e)) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    """DCP stores non-tensor values (param-group options, counters) as pickled bytes and reads
    them with ``weights_only=False``; these planners read them with ``weights_only=True``."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_refusal(f"item {fqn}", e)) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    pass


class SafeEmptyLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the whole state dict from the metadata (the consolidator)."""


def unsafe_failure(error: BaseException) -> UnsafeCheckpointError | None:
    """The UnsafeCheckpointError inside a DCP CheckpointException (gathered from any rank)."""
    if isinstance(error, UnsafeCheckpointError):
        return error
    for failure in (getattr(error, "failures", None) or {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, UnsafeCheckpointError):
            return exc
    return None


def read_dcp_metadata(path: str | os.PathLike):
    return SafeFileSystemReader(str(Path(path))).read_metadata()
