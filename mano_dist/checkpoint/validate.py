"""Checks run before any rank touches a checkpoint, so a bad one fails with a clear message
instead of a hang or a half-loaded model. Each function returns an error (or None) for this rank;
``Checkpointer.load`` gathers them and raises the same error on every rank."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from . import layout, safe
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)

_CHUNK = 1 << 22


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest_files(path: Path) -> list[str]:
    """Every file of a checkpoint but the manifest and the marker, relative, sorted."""
    path = Path(path)
    return sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name not in (layout.MANIFEST, layout.COMPLETE)
    )


def file_entries(path: Path, names, checksums: bool = True) -> dict[str, list]:
    """{name: [size, CRC-32 or None]} for the given files of ``path``."""
    path = Path(path)
    return {n: [(path / n).stat().st_size, crc32_of(path / n) if checksums else None] for n in names}


PARTIAL_SUFFIX = ".partial"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.partial`` + fsync + rename: a crash leaves the
    old file or the new one, never a torn one under the real name."""
    path = Path(path)
    part = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`write_atomic`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def write_manifest(path: Path, checksums: bool = True, known: dict[str, list] | None = None) -> None:
    """Record size (and CRC-32) of every file; ``known`` entries (computed by other ranks) are
    reused, the rest computed here."""
    path = Path(path)
    known = known or {}
    names = manifest_files(path)
    entries = {**file_entries(path, [n for n in names if n not in known], checksums),
               **{n: known[n] for n in names if n in known}}
    write_atomic(path / layout.MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=0).encode())


def check_present(path: Path) -> CheckpointError | None:
    """The folder exists and was marked complete."""
    path = Path(path)
    if not path.is_dir():
        return CheckpointNotFoundError(f"Checkpoint folder {str(path)!r} does not exist")
    if path.name.endswith(layout.TMP_SUFFIX) or not layout.is_complete(path):
        newest = layout.complete_checkpoints(path.parent)
        hint = f"; the newest complete one is {str(newest[-1][1])!r}" if newest else ""
        return IncompleteCheckpointError(
            f"Checkpoint {str(path)!r} is incomplete (no {layout.COMPLETE} marker): its save was "
            f"interrupted or is still running{hint}"
        )
    return None


def check_files(path: Path, rank: int = 0, world_size: int = 1, checksums: bool = True) -> CheckpointError | None:
    """Every file of the manifest exists with its size; this rank checksums its share of them
    (``checksums=False``: sizes only). Runs before any file of the checkpoint is unpickled."""
    path = Path(path)
    try:
        entries = json.loads((path / layout.MANIFEST).read_text())["files"]
        entries = {str(name): (int(size), None if crc is None else int(crc)) for name, (size, crc) in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return CorruptCheckpointError(f"Checkpoint {str(path)!r}: cannot read {layout.MANIFEST}: {e!r}")
    for i, (name, (size, crc)) in enumerate(sorted(entries.items())):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return CorruptCheckpointError(f"Checkpoint {str(path)!r}: {layout.MANIFEST} names {name!r}, outside the folder")
        f = path / name
        if not f.is_file():
            return CorruptCheckpointError(f"Checkpoint {str(path)!r}: file {name!r} is missing")
        actual = f.stat().st_size
        if actual != size:
            return CorruptCheckpointError(
                f"Checkpoint {str(path)!r}: file {name!r} is truncated or altered "
                f"({actual} bytes, {size} were written)"
            )
        if checksums and crc is not None and i % world_size == rank and crc32_of(f) != crc:
            return CorruptCheckpointError(
                f"Checkpoint {str(path)!r}: file {name!r} is corrupted (CRC-32 differs from the one "
                "recorded at save time)"
            )
    return None


def read_meta(path: Path) -> tuple[dict[str, Any] | None, CheckpointError | None]:
    """``checkpointer.pt``, read with ``weights_only=True`` (plain dicts, numbers, strings)."""
    file = Path(path) / layout.META
    try:
        meta = safe.load(file)
    except CheckpointError as e:
        return None, type(e)(f"Checkpoint {str(path)!r}: {e}")
    if not isinstance(meta, dict) or not {"step", "extra"} <= set(meta):
        return None, CorruptCheckpointError(f"Checkpoint {str(path)!r}: {layout.META} holds no step/extra record")
    return meta, None


def read_rng(path: Path, rank: int) -> tuple[dict[str, Any] | None, CheckpointError | None]:
    """This rank's RNG states (``weights_only=True`` plus numpy's state), or (None, None) if the
    checkpoint has none for this rank (it was saved at a smaller world size)."""
    file = layout.rng_file(path, rank)
    if not file.is_file():
        return None, None
    try:
        state = safe.load(file, safe.rng_globals())
    except CheckpointError as e:
        return None, type(e)(f"Checkpoint {str(path)!r}: {e}")
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        return None, CorruptCheckpointError(f"Checkpoint {str(path)!r}: {file.name} holds no RNG states")
    return state, None


def read_dcp_metadata(path: Path):
    """DCP's ``.metadata`` (a pickle) through the restricted unpickler of :mod:`.safe`."""
    try:
        return safe.read_dcp_metadata(path), None
    except CheckpointError as e:
        return None, type(e)(f"Checkpoint {str(path)!r}: {e}")
    except Exception as e:  # noqa: BLE001
        return None, CorruptCheckpointError(
            f"Checkpoint {str(path)!r}: cannot read the DCP metadata ({layout.DCP_METADATA}): {e}"
        )


def tensor_shapes(state: dict[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in nested dicts, keyed like DCP flattens them ("a.b.c")."""
    out: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = tuple(value.shape)  # a DTensor's shape is the global one
        elif isinstance(value, dict):
            out.update(tensor_shapes(value, name + "."))
    return out


def check_compatible(expected: dict[str, tuple[int, ...]], metadata, sections=("model.", "optim.state.")):
    """The first key whose presence or shape differs between this model/optimizer and the file."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        k: tuple(m.size)
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and k.startswith(sections)
    }
    for key, shape in expected.items():
        if key not in saved:
            return CheckpointMismatchError(
                f"Checkpoint does not match this model/optimizer: {key!r} (shape {list(shape)}) is not "
                f"in the checkpoint"
            )
        if saved[key] != shape:
            return CheckpointMismatchError(
                f"Checkpoint does not match this model/optimizer: {key!r} has shape "
                f"{list(saved[key])} in the checkpoint but {list(shape)} here"
            )
    for key, shape in saved.items():
        if key not in expected and key.startswith(tuple(s for s in sections if any(e.startswith(s) for e in expected))):
            return CheckpointMismatchError(
                f"Checkpoint does not match this model/optimizer: the checkpoint has {key!r} "
                f"(shape {list(shape)}), which is not here"
            )
    return None
