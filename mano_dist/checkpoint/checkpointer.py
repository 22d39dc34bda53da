"""Checkpointer: model, optimizer, scheduler, data position, RNG and step in ``step-N`` folders,
written through DCP (sharded, reshardable on load), sync or async, crash-safe, last K kept.

Crash safety: every rank writes into ``step-N.tmp``; rank 0 marks it complete (manifest of sizes
and checksums, a ``COMPLETE`` file, then an atomic rename to ``step-N``) only after DCP's final
gather, which happens after every rank has written its shards. A crash at any moment therefore
leaves either the previous checkpoints or a complete new one as ``latest()``. Old checkpoints are
renamed away before they are deleted, so a crash while pruning never leaves a half-deleted one
under a ``step-N`` name. The folder must be visible to every rank (a shared file system), as DCP
needs anyway. ``checkpointer.pt``, the RNG files and the manifest are each written to a temporary
name, fsynced and renamed.

Loading runs no code from the checkpoint: sizes and checksums are verified first, then every
pickle is read with ``weights_only=True`` (see :mod:`.safe`). ``load("auto")`` falls back, on
every rank alike, to the newest checkpoint that passes its checks.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from . import layout, rng, safe, validate
from .errors import CheckpointError, CheckpointMismatchError, CorruptCheckpointError, UnsafeCheckpointError

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _quiet_no_dist():
    """Single-process saves and loads pass no_dist=True on purpose; DCP warns about it anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


_background_filter_added = False


def _quiet_background_no_dist() -> None:
    """A single-process async save warns from DCP's writer thread, after any scoped filter of
    ours has been restored (``catch_warnings`` is not per thread): only this message, added
    once, when such a Checkpointer is built (never at import)."""
    global _background_filter_added
    if not _background_filter_added:
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        _background_filter_added = True


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _agreed(error: CheckpointError | None) -> CheckpointError | None:
    """The first rank's error (or None), the same on every rank (one all_gather)."""
    if not _distributed():
        return error
    errors: list[Any] = [None] * _world()
    dist.all_gather_object(errors, (type(error), str(error)) if error is not None else None)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return None
    cls, message = first
    return error if error is not None and type(error) is cls and str(error) == message else cls(message)


def _agree(error: CheckpointError | None) -> None:
    """Raise the first rank's error on every rank (one all_gather), so no rank goes on alone."""
    error = _agreed(error)
    if error is not None:
        raise error


def _views_if_different(values: list) -> list | None:
    """None if every rank holds the same ``values``, else what each rank holds (one all_gather):
    a checkpoint folder that is not on a file system shared by every rank."""
    if not _distributed():
        return None
    seen: list[Any] = [None] * _world()
    dist.all_gather_object(seen, values)
    return None if all(v == values for v in seen) else seen


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    """``checkpointer.pt``'s bytes, refused here (not at resume) if ``weights_only`` loading
    could not read them back: ``extra`` and the scheduler state must be plain data."""
    buf = io.BytesIO()
    torch.save(meta, buf)
    data = buf.getvalue()
    try:
        safe.load(io.BytesIO(data))
    except UnsafeCheckpointError as e:
        detail = str(e).split("refuses", 1)[-1].split(";")[0].strip()
        raise CheckpointError(
            f"Cannot save: extra / scheduler state hold objects that weights_only loading refuses "
            f"{detail}; keep them to dicts, lists, tuples, str, numbers, bools, None and tensors"
        ) from None
    return data


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
        if async_save and not _distributed():
            _quiet_background_no_dist()

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
        returns when async). ``extra`` is a small dict of plain data (data position, ...): it
        is read back with ``weights_only=True``, so dicts, lists, tuples, str, numbers, bools,
        None and tensors only (anything else is refused here, before a byte is written).
        A failure on any rank before DCP's collective write (folder, RNG file, metadata) raises
        CheckpointError on every rank."""
        import torch.distributed.checkpoint as dcp

        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if model is None:
            raise ValueError("Checkpointer.save needs a model")
        self.wait()
        rank = _rank()
        final, tmp = layout.step_dir(self.folder, step), layout.tmp_dir(self.folder, step)
        error = None
        if rank == 0:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left by a save that was killed: start over
                    shutil.rmtree(tmp)
            except OSError as e:  # shared below: the other ranks must not wait in a collective
                error = CheckpointError(f"Cannot prepare {str(tmp)!r} for step {step}: {e}")
        _agree(error)  # also the barrier: no rank writes into tmp before rank 0 cleared it
        error = None
        try:
            (tmp / layout.RNG_DIR).mkdir(parents=True, exist_ok=True)
            validate.save_atomic(rng.capture(), layout.rng_file(tmp, rank))
            if rank == 0:
                meta = {
                    "format": 1,
                    "step": step,
                    "extra": extra or {},
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "world_size": _world(),
                }
                validate.write_atomic(tmp / layout.META, _meta_bytes(meta))
        except CheckpointError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - disk full, permissions: every rank raises
            error = CheckpointError(f"Cannot write step {step} into {str(tmp)!r} (rank {rank}): {e}")
        _agree(error)
        state = _state_dicts(model, optimizer)
        if not self.async_save:
            with _quiet_no_dist():
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
        with _quiet_no_dist():
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
        restore this rank's RNG states. Returns ``{"step", "extra", "path"}``.

        ``path="auto"`` takes the newest complete checkpoint that passes its checks and returns
        None when there is no complete one. One that fails them (corrupt, refused by
        ``weights_only``, unreadable) is skipped with a warning naming it and why, and the next
        older one is tried, alike on every rank; if none loads, CheckpointError lists them all.
        CheckpointMismatchError (another model or optimizer) is raised, never skipped, and an
        explicit ``path`` is never replaced by another.

        Raises (on every rank, before any rank loads anything) a subclass of CheckpointError:
        CheckpointNotFoundError, IncompleteCheckpointError, CheckpointMismatchError (naming the
        first key that differs and both shapes), CorruptCheckpointError, or its subclass
        UnsafeCheckpointError (a pickle holds objects ``weights_only`` loading refuses).
        """
        self.wait()
        if path != "auto" and path is not None:
            return self._load_one(Path(path), model, optimizer, scheduler, restore_rng)
        candidates = self._agreed_checkpoints()
        failures = []
        for candidate in reversed(candidates):
            try:
                return self._load_one(Path(candidate), model, optimizer, scheduler, restore_rng)
            except CheckpointMismatchError:
                raise
            except CheckpointError as e:
                failures.append(f"{candidate!r}: {e}")
                warnings.warn(f"Skipping checkpoint {candidate!r}, it cannot be loaded: {e}; trying the next "
                              "older one", stacklevel=2)
        if failures:
            raise CheckpointError(f"No checkpoint in {str(self.folder)!r} can be loaded: " + " | ".join(failures))
        return None

    def _agreed_checkpoints(self) -> list[str]:
        """The complete checkpoints, checked to be the same list on every rank."""
        found = self.checkpoints()
        seen = _views_if_different(found)
        if seen is not None:
            newest = [s[-1] if s else None for s in seen]
            _agree(CheckpointError(
                f"Ranks see different newest checkpoints in {str(self.folder)!r}: {newest}; the "
                "folder must be on a file system shared by every rank"
            ))
        return found

    def _load_one(self, path: Path, model, optimizer, scheduler, restore_rng: bool) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = _state_dicts(model, optimizer)
        meta, rng_state, error = self._check(path, state, restore_rng)
        _agree(error)
        try:
            with _quiet_no_dist():
                dcp.load(state, storage_reader=safe.SafeFileSystemReader(str(path)), planner=safe.SafeLoadPlanner(),
                         no_dist=not _distributed())
        except (Exception, CheckpointException) as e:  # DCP gathered it: raised on every rank
            unsafe = safe.unsafe_failure(e)
            if unsafe is not None:
                raise UnsafeCheckpointError(f"Checkpoint {str(path)!r}: {unsafe}") from None
            raise CorruptCheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
        if "optim" in state:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if restore_rng:
            if rng_state is not None:
                rng.restore(rng_state)
            else:
                warnings.warn(
                    f"{str(path)!r} has no RNG state for rank {_rank()} (saved with world size "
                    f"{meta.get('world_size')}); RNG states were left as they are",
                    stacklevel=3,
                )
        return {"step": int(meta["step"]), "extra": meta["extra"], "path": str(path)}

    def _check(self, path: Path, state: dict[str, Any], read_rng: bool = True):
        """This rank's verdict on ``path``: (meta, this rank's RNG state or None, error or None).
        Sizes and checksums are verified before any file is unpickled, and every pickle is read
        with ``weights_only=True``."""
        error = validate.check_present(path)
        if error is None:
            error = validate.check_files(path, _rank(), _world(), checksums=self.checksums)
        if error is not None:
            return None, None, error
        meta, error = validate.read_meta(path)
        if error is not None:
            return None, None, error
        rng_state = None
        if read_rng:
            rng_state, error = validate.read_rng(path, _rank())
            if error is not None:
                return None, None, error
        metadata, error = validate.read_dcp_metadata(path)
        if error is not None:
            return None, None, error
        return meta, rng_state, validate.check_compatible(validate.tensor_shapes(state), metadata)
