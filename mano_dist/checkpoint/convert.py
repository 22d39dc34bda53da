"""Consolidate a sharded checkpoint into one ``torch.save`` file (export, inspection).

    python -m mano_dist.checkpoint.convert <step-folder or run folder> <out.pt> [--model-only]
    mano-consolidate ...                                    (same, installed script)

The output is ``{"model": {fqn: full tensor}, "optim": {...}, "step": N, "extra": {...},
"scheduler": {...}}``; with ``--model-only`` just the model's ``{fqn: tensor}``, which
``model.load_state_dict`` of an unsharded model accepts. Runs in one process, no process group,
and needs memory for the whole checkpoint.

Nothing in the checkpoint runs: sizes and checksums are checked first and every pickle is read
with ``weights_only=True`` (see :mod:`mano_dist.checkpoint.safe`). The output is written to
``<out>.tmp``, fsynced and renamed, so a failed or killed run never leaves a torn ``<out>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import layout, safe, validate
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError


def _resolve(path: Path) -> Path:
    """A run folder (holding step-N folders) means its newest complete checkpoint."""
    if path.is_dir() and not (path / layout.DCP_METADATA).exists() and layout.step_of(path) is None:
        found = layout.complete_checkpoints(path)
        if not found:
            raise CheckpointNotFoundError(f"{str(path)!r} holds no complete step-N checkpoint")
        return found[-1][1]
    return path


def _check(path: Path) -> Path:
    path = _resolve(Path(path))
    written_by_checkpointer = (path / layout.META).exists() or path.name.endswith(layout.TMP_SUFFIX)
    if not path.is_dir() or written_by_checkpointer or not (path / layout.DCP_METADATA).exists():
        error = validate.check_present(path)
        if error is not None:
            raise error
    if (path / layout.MANIFEST).exists():
        error = validate.check_files(path)
        if error is not None:
            raise error
    return path


def _read(path: Path) -> dict[str, Any]:
    """The whole DCP checkpoint as nested dicts of full tensors, through the safe reader."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=safe.SafeFileSystemReader(str(path)),
                         planner=safe.SafeEmptyLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        unsafe = safe.unsafe_failure(e)
        if unsafe is not None:
            raise UnsafeCheckpointError(f"Checkpoint {str(path)!r}: {unsafe}") from None
        raise CorruptCheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
    return state


def write_file(state: Any, out: Path) -> None:
    """``torch.save`` to ``<out>.tmp``, fsync, rename over ``out`` (never a torn ``out``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def consolidate(path, out, model_only: bool = False) -> dict[str, Any]:
    """Write the consolidated state of checkpoint ``path`` to ``out``; returns what was written.

    Plain DCP folders (not written by the Checkpointer) work too, without the extra checks."""
    path = _check(path)
    meta = None
    if not model_only and (path / layout.META).exists():
        meta, error = validate.read_meta(path)
        if error is not None:
            raise error
    state = _read(path)
    if model_only:
        state = state["model"]
    elif meta is not None:
        state.update(step=meta["step"], extra=meta["extra"], scheduler=meta.get("scheduler"))
    write_file(state, Path(out))
    return state


def _count(state) -> tuple[int, int]:
    if isinstance(state, torch.Tensor):
        return 1, state.numel()
    if isinstance(state, dict):
        pairs = [_count(v) for v in state.values()]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return 0, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mano-consolidate",
        description="Consolidate a sharded (DCP) checkpoint into one torch.save file.",
    )
    parser.add_argument("checkpoint", help="a step-N folder, or a run folder (its newest complete step-N)")
    parser.add_argument("out", help="output .pt file")
    parser.add_argument("--model-only", action="store_true", help="write only the model's {name: tensor}")
    args = parser.parse_args(argv)
    try:
        state = consolidate(args.checkpoint, args.out, model_only=args.model_only)
    except (CheckpointError, OSError) as e:
        print(f"mano-consolidate: error: {e}", file=sys.stderr)
        return 1
    tensors, numel = _count(state.get("model", state) if not args.model_only else state)
    step = "" if args.model_only else f" from step {state.get('step')}"
    print(f"wrote {args.out}: model has {tensors} tensors, {numel} elements{step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
