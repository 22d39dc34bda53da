"""Checkpointer: model, optimizer, scheduler, data position, RNG and step in ``step-N`` folders,
written through DCP (sharded, reshardable on load), sync or async, crash-safe, last K kept.

Crash safety: every rank writes into ``step-N.tmp``; rank 0 marks it complete (manifest of sizes
and checksums, a ``COMPLETE`` file, then an atomic rename to ``step-N``) only after DCP's final
gather, which happens after every rank has written its shards. A crash at any moment therefore
leaves either the previous checkpoints or a complete new one as ``latest()``. Old checkpoints are
renamed away before they are deleted, so a crash while pruning never leaves a half-deleted one
under a ``step-N`` name. The folder must be visible to every rank (a shared file system), as DCP
needs anyway.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from . import layout, rng, validate
from .errors import CheckpointError, CorruptCheckpointError


# Single-process saves and loads pass no_dist=True; DCP's async thread still warns about it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _agree(error: CheckpointError | None) -> None:
    """Raise the first rank's error on every rank (one all_gather), so no rank goes on alone."""
    if _distributed():
        errors: list[Any] = [None] * _world()
        dist.all_gather_object(errors, (type(error), str(error)) if error is not None else None)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            cls, message = first
            raise cls(message)
    elif error is not None:
        raise error


def _state_dicts(model, optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...} through the standard DCP state-dict API (sharded DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if model is None:
        raise ValueError("Checkpointer needs a model")
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _remove(path: Path) -> None:
    """Rename, then delete: a crash mid-delete leaves a folder no one mistakes for a checkpoint."""
    trash = path.with_name(path.name + layout.TRASH_SUFFIX)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Save and resume a training run. ``save``, ``wait`` and ``load`` are collective: every rank
    calls them in the same order (like DCP). Constructing one with ``async_save=True`` under a
    process group is collective too (it creates the gloo group the background writes use, so they
    never interleave with training collectives on the default group).

    Args:
        folder: holds the ``step-N`` folders (created on first save).
        keep_last: complete checkpoints kept after each save (None or 0 keeps all).
        async_save: write in a background thread; the call returns once DCP has staged (copied)
            the state, so training may overwrite params and optimizer state right away.
        checksums: record CRC-32s at save and verify them on load (each rank checks a share).
    """

    def __init__(self, folder, keep_last: int | None = 3, async_save: bool = False, *, checksums: bool = True):
        if keep_last is not None and keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 or None, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.async_save = async_save
        self.checksums = checksums
        self._pending = None  # (future, step) of the async save in flight
        self._finalized = threading.Event()
        self._finalize_error: BaseException | None = None
        self._group = dist.new_group(backend="gloo") if async_save and _distributed() else None

    # ------------------------------------------------------------------ queries
    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        found = layout.complete_checkpoints(self.folder)
        return str(found[-1][1]) if found else None

    def checkpoints(self) -> list[str]:
        """Paths of every complete checkpoint, oldest first."""
        return [str(p) for _, p in layout.complete_checkpoints(self.folder)]

    # ------------------------------------------------------------------ save
    def save(self, step: int, model=None, optimizer=None, scheduler=None, extra: dict | None = None) -> str:
        """Write checkpoint ``step-<step>``; returns its final path (complete once ``wait``
        returns when async). ``extra`` is a small picklable dict (data position, ...)."""
        import torch.distributed.checkpoint as dcp

        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if model is None:
            raise ValueError("Checkpointer.save needs a model")
        self.wait()
        rank = _rank()
        final, tmp = layout.step_dir(self.folder, step), layout.tmp_dir(self.folder, step)
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that was killed: start over
                shutil.rmtree(tmp)
        _barrier()
        (tmp / layout.RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(rng.capture(), layout.rng_file(tmp, rank))
        if rank == 0:
            meta = {
                "format": 1,
                "step": step,
                "extra": extra or {},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "world_size": _world(),
            }
            torch.save(meta, tmp / layout.META)
        state = _state_dicts(model, optimizer)
        if not self.async_save:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
            known = self._checksum_share(tmp) if self.checksums and _distributed() else None
            error = None
            if rank == 0:
                try:
                    self._finalize(tmp, final, known)
                except Exception as e:  # noqa: BLE001 - shared below so no rank waits forever
                    error = CheckpointError(f"Could not mark checkpoint {str(final)!r} complete: {e}")
            _agree(error)
            return str(final)
        future = dcp.async_save(
            state, checkpoint_id=str(tmp), process_group=self._group, no_dist=not _distributed()
        )
        self._finalized.clear()
        self._finalize_error = None
        if rank == 0:
            future.add_done_callback(lambda f: self._finalize_after(f, tmp, final))
        else:
            self._finalized.set()
        self._pending = (future, step)
        return str(final)

    def _finalize_after(self, future, tmp: Path, final: Path) -> None:
        try:
            if future.exception() is None:
                self._finalize(tmp, final)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._finalize_error = e
        finally:
            self._finalized.set()

    def _checksum_share(self, tmp: Path) -> dict[str, list]:
        """Sync saves: each rank checksums 1/world of the files (all are written once dcp.save
        returns); rank 0 gets them all. Rank 0 computes any file it did not receive."""
        names = validate.manifest_files(tmp)
        mine = validate.file_entries(tmp, names[_rank() :: _world()])
        shares: list[Any] = [None] * _world()
        dist.all_gather_object(shares, mine)
        return {name: entry for share in shares for name, entry in share.items()}

    def _finalize(self, tmp: Path, final: Path, known: dict[str, list] | None = None) -> None:
        """Rank 0, after DCP's last gather (so every rank's files are written): mark complete."""
        validate.write_manifest(tmp, checksums=self.checksums, known=known)
        with open(tmp / layout.COMPLETE, "w") as f:
            f.write("complete\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(self.folder)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        found = layout.complete_checkpoints(self.folder)
        if self.keep_last:
            for _, path in found[: max(0, len(found) - self.keep_last)]:
                if path != keep:
                    _remove(path)
        for path in self.folder.iterdir():  # leftovers of killed saves and deletes
            if path.name.endswith(layout.TRASH_SUFFIX):
                shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written and marked complete."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        error: BaseException | None = None
        try:
            future.result()
        except BaseException as e:  # noqa: BLE001
            error = e
        self._finalized.wait()
        if error is None and self._finalize_error is not None:
            error = self._finalize_error
        _agree(CheckpointError(f"Async save of step {step} failed: {error!r}") if error is not None else None)

    def close(self) -> None:
        self.wait()

    # ------------------------------------------------------------------ load
    def load(self, model=None, optimizer=None, scheduler=None, path: str | os.PathLike | None = "auto",
             restore_rng: bool = True) -> dict[str, Any] | None:
        """Load a checkpoint into model/optimizer/scheduler (any world size, any sharding) and
        restore this rank's RNG states. ``path="auto"`` picks the newest complete checkpoint and
        returns None when there is none. Returns ``{"step", "extra", "path"}``.

        Raises (on every rank, before any rank loads anything) a subclass of CheckpointError:
        CheckpointNotFoundError, IncompleteCheckpointError, CheckpointMismatchError (naming the
        first key that differs and both shapes) or CorruptCheckpointError.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        self.wait()
        if path == "auto" or path is None:
            path = self.latest()
            if _distributed():
                seen: list[Any] = [None] * _world()
                dist.all_gather_object(seen, path)
                if len(set(seen)) != 1:
                    _agree(CheckpointError(
                        f"Ranks see different newest checkpoints in {str(self.folder)!r}: {seen}; the "
                        "folder must be on a file system shared by every rank"
                    ))
            if path is None:
                return None
        path = Path(path)
        state = _state_dicts(model, optimizer)
        meta, error = self._check(path, state)
        _agree(error)
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
        except (Exception, CheckpointException) as e:  # DCP gathered it: raised on every rank
            raise CorruptCheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
        if "optim" in state:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if restore_rng:
            rng_path = layout.rng_file(path, _rank())
            if rng_path.is_file():
                rng.restore(torch.load(rng_path, weights_only=False))
            else:
                warnings.warn(
                    f"{str(path)!r} has no RNG state for rank {_rank()} (saved with world size "
                    f"{meta.get('world_size')}); RNG states were left as they are",
                    stacklevel=2,
                )
        return {"step": int(meta["step"]), "extra": meta["extra"], "path": str(path)}

    def _check(self, path: Path, state: dict[str, Any]):
        """This rank's verdict on ``path``: (meta, None) or (None, the error)."""
        error = validate.check_present(path)
        if error is not None:
            return None, error
        meta, error = validate.read_meta(path)
        if error is not None:
            return None, error
        if self.checksums:
            error = validate.check_files(path, _rank(), _world())
            if error is not None:
                return None, error
        metadata, error = validate.read_dcp_metadata(path)
        if error is not None:
            return None, error
        return meta, validate.check_compatible(validate.tensor_shapes(state), metadata)
