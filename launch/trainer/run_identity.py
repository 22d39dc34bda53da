"""Which run an output folder belongs to, and one run at a time in it.

Two runs sharing ``out_dir`` used to mix (issue 24): run A left step-2 and step-4; run B
(``--resume none``, another seed) overwrote step-2, pruning deleted B's step-2 and kept A's
step-4, and B's ``--resume auto`` "resumed from step-4", run A's. Three guards now:

- ``out_dir/run.lock``: rank 0 holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on it for the whole run
  (the kernel drops it when the process ends, even by SIGKILL, so a crash leaves no stale lock),
  and a second run on the folder fails at start, naming the holder. flock reaches other nodes on
  NFS (Linux emulates it with POSIX locks) and on Lustre mounted with ``flock``; on a file
  system that refuses locks the run goes on with a warning.
- ``--resume none`` refuses a folder that holds checkpoints (any ``step-*`` under
  ``checkpoints/`` or ``ds_checkpoints/``) unless ``--overwrite``, which deletes them first.
- ``out_dir/run.json``: a random run id made at a fresh start, and the config's fingerprint
  (what a resume must not change: model shape, seed, data). The trainer copies it into every
  checkpoint folder it completes (``stamp``). A resume refuses a checkpoint stamped with another
  run's id, or a config whose fingerprint differs from the run's. A folder without run.json
  (checkpoints copied to a new place) takes the identity of the checkpoints it resumes.

Every decision about the folder is made by rank 0 alone (the file system is shared; two ranks
deciding could disagree) and broadcast in one collective, so every rank raises the same
``RunFolderError``, or none, and no rank waits in a collective a peer has left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch.distributed as dist

RUN_JSON = "run.json"
LOCK = "run.lock"
CHECKPOINT_FOLDERS = ("checkpoints", "ds_checkpoints")  # FSDP2's Checkpointer, DeepSpeed's tags
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; raised alike on every rank."""


def fingerprint(cfg) -> dict:
    """What must be the same to resume a run: the model's shape, the seed (initialisation and
    data order) and the data (source, tokenizer, windows, split). Not the world size, batch
    split or precision: a run may resume on another number of ranks."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
    return json.loads(json.dumps({"model": dataclasses.asdict(cfg.model), "seed": cfg.train.seed, "data": data}))


def _differences(saved: dict, want: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(want)):
        a, b = saved.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} here")
    return out


def write_json(path: Path, data: dict) -> None:
    """Temporary file, fsync, rename, fsync of the folder: a crash leaves the old file or the new
    one, never a torn one."""
    part = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(part, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict | None:
    """A run.json's content; None when there is none; RunFolderError when it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read: {e}; if this folder's run is over, move it away") from None
    if not isinstance(data, dict) or "run_id" not in data or "fingerprint" not in data:
        raise RunFolderError(f"{path} holds no run identity (run_id, fingerprint)")
    return data


def saved_steps(out: Path) -> list[Path]:
    """Every ``step-*`` entry (complete, temporary or being deleted) of both checkpoint folders."""
    return sorted(p for name in CHECKPOINT_FOLDERS if (out / name).is_dir()
                  for p in (out / name).iterdir() if p.name.startswith("step-"))


def complete_checkpoints(folder: Path) -> list[Path]:
    """The ``step-N`` folders marked ``COMPLETE`` (both engines' savers write that marker)."""
    from mano_dist.checkpoint import layout

    return [p for _, p in layout.complete_checkpoints(folder)]


def agree(decide, rank: int):
    """``decide()`` on rank 0, its result (or its RunFolderError) broadcast: every rank returns
    the same value or raises the same error. Collective."""
    outcome = [None]
    if rank == 0:
        try:
            outcome[0] = ("ok", decide())
        except (RunFolderError, OSError) as e:
            outcome[0] = ("error", str(e) if isinstance(e, RunFolderError) else f"{type(e).__name__}: {e}")
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise RunFolderError(value)
    return value


class RunFolder:
    """The claimed output folder: its identity (``run_id``, ``fingerprint``), notes for the log,
    and on rank 0 the lock, held until ``release`` (or the process ends)."""

    def __init__(self, out: Path, identity: dict, notes: list[str], lock_fd: int | None):
        self.out, self.identity, self.notes, self._lock_fd = out, identity, notes, lock_fd

    @property
    def run_id(self) -> str:
        return self.identity["run_id"]

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def stamp(self, checkpoint: Path, step: int, rank: int) -> None:
        """Rank 0 writes this run's identity into a completed checkpoint folder, next to its files
        (they are checked against their manifest, which lists only the saver's files). Collective.
        A folder gone meanwhile (pruned by an async save's completion) is nothing to stamp."""

        def write() -> None:
            record = {"run_id": self.run_id, "fingerprint": self.identity["fingerprint"], "step": step}
            with contextlib.suppress(FileNotFoundError):
                write_json(Path(checkpoint) / RUN_JSON, record)

        agree(write, rank)


def claim(cfg, resume: str, overwrite: bool, rank: int) -> RunFolder:
    """Lock ``cfg.train.out_dir`` for this run (rank 0), decide its identity from what the folder
    holds and what was asked, and share that with every rank. Collective; raises RunFolderError
    on every rank when the folder is in use, holds another run's checkpoints, or holds
    checkpoints ``--resume none`` would mix with (without ``--overwrite``)."""
    out = Path(cfg.train.out_dir)
    lock_fd = None

    def decide():
        nonlocal lock_fd
        lock_fd = _lock(out)
        try:
            return _decide(out, cfg, resume, overwrite)
        except (RunFolderError, OSError):
            if lock_fd is not None:  # refused: the folder is free again
                os.close(lock_fd)
            lock_fd = None
            raise

    identity, notes = agree(decide, rank)
    return RunFolder(out, identity, notes, lock_fd)


def _lock(out: Path) -> int | None:
    """The descriptor holding ``out/run.lock`` (its content names the holder), or None on a file
    system without locks (warned)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = path.read_text().strip() or "a process that has not written its name yet"
            raise RunFolderError(f"{out} is in use by another run ({holder}): {path} is locked; wait for that "
                                 f"run to end, or give this one another --out-dir") from None
        if e.errno in _NO_LOCKS:
            warnings.warn(f"cannot lock {path} ({e}): this file system refuses locks, so a second run on "
                          f"{out} would not be detected", stacklevel=2)
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def _new(out: Path, cfg, notes: list[str], why: str) -> tuple[dict, list[str]]:
    identity = {"run_id": secrets.token_hex(6), "fingerprint": fingerprint(cfg),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(out / RUN_JSON, identity)
    return identity, notes + [f"run {identity['run_id']} ({why}), identity in {out / RUN_JSON}"]


def _decide(out: Path, cfg, resume: str, overwrite: bool) -> tuple[dict, list[str]]:
    """Rank 0, lock held: the run's identity and notes, or RunFolderError. Deletes only on
    ``--resume none --overwrite``."""
    folder = read_json(out / RUN_JSON)
    if resume == "none":
        old = saved_steps(out)
        if old and not overwrite:
            owner = f"run {folder['run_id']}" if folder else "a run with no run.json"
            raise RunFolderError(
                f"--resume none: {out} already holds checkpoints of {owner} "
                f"({', '.join(str(p.relative_to(out)) for p in old[:4])}{', ...' if len(old) > 4 else ''}); "
                f"nothing was deleted. Continue that run with --resume auto, give this one another --out-dir, "
                f"or add --overwrite to delete them and start over")
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for name in CHECKPOINT_FOLDERS:  # DeepSpeed's pointer to its newest tag
            (out / name / "latest").unlink(missing_ok=True)
        notes = [f"--overwrite: deleted {len(old)} old checkpoint(s) of "
                 f"{'run ' + folder['run_id'] if folder else 'a run with no run.json'}"] if old else []
        return _new(out, cfg, notes, "new")

    engine_folder = out / ("ds_checkpoints" if cfg.parallel.engine == "deepspeed" else "checkpoints")
    candidates = complete_checkpoints(engine_folder) if resume == "auto" else [Path(resume)]
    stamps = {path: read_json(path / RUN_JSON) for path in candidates}
    want = fingerprint(cfg)
    if folder is not None:
        for path, stamp in stamps.items():
            if stamp is not None and stamp["run_id"] != folder["run_id"]:
                raise RunFolderError(
                    f"checkpoint {path} belongs to run {stamp['run_id']}, but {out / RUN_JSON} to run "
                    f"{folder['run_id']}: two runs wrote into {out}; refusing to resume across them. Move the "
                    f"foreign checkpoint away, or start over with --resume none --overwrite")
        if candidates or folder["fingerprint"] == want:
            _same_fingerprint(folder, want, out / RUN_JSON)
            return folder, [f"run {folder['run_id']} ({'resuming' if candidates else 'restarting, no checkpoint yet'})"]
        return _new(out, cfg, [f"{out / RUN_JSON} was run {folder['run_id']} with another config and left no "
                               f"checkpoint"], "new")
    ids = {stamp["run_id"]: stamp for stamp in stamps.values() if stamp is not None}
    if len(ids) > 1:
        raise RunFolderError(f"{engine_folder} holds checkpoints of several runs ({', '.join(sorted(ids))}) and "
                             f"{out} has no {RUN_JSON} to tell which is this folder's; keep one run's checkpoints")
    if ids:  # checkpoints copied to a new folder: it continues their run
        (stamp,) = ids.values()
        _same_fingerprint(stamp, want, next(p for p, s in stamps.items() if s is not None) / RUN_JSON)
        identity = {"run_id": stamp["run_id"], "fingerprint": stamp["fingerprint"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(out / RUN_JSON, identity)
        return identity, [f"run {stamp['run_id']} (taken from its checkpoints), identity in {out / RUN_JSON}"]
    why = "new; its checkpoints predate run identities" if candidates else "new"
    return _new(out, cfg, [], why)


def _same_fingerprint(saved: dict, want: dict, where: Path) -> None:
    diff = _differences(saved["fingerprint"], want)
    if diff:
        raise RunFolderError(f"this config differs from run {saved['run_id']}'s ({where}) in what a resume must keep: "
                             f"{'; '.join(diff)}. Resume with the run's settings, or start a new run (another "
                             f"--out-dir, or --resume none --overwrite)")
