"""Consolidate a sharded checkpoint into one ``torch.save`` file (export, inspection).

    python -m mano_dist.checkpoint.convert <step-folder or run folder> <out.pt> [--model-only]
    mano-consolidate ...                                    (same, installed script)

The output is ``{"model": {fqn: full tensor}, "optim": {...}, "step": N, "extra": {...},
"scheduler": {...}}``; with ``--model-only`` just the model's ``{fqn: tensor}``, which
``model.load_state_dict`` of an unsharded model accepts. Runs in one process, no process group,
and needs memory for the whole checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import layout, validate
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError


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


def consolidate(path, out, model_only: bool = False) -> dict[str, Any]:
    """Write the consolidated state of checkpoint ``path`` to ``out``; returns what was written.

    Plain DCP folders (not written by the Checkpointer) work too, without the extra checks."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = _check(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, map_location="cpu", weights_only=False, mmap=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CorruptCheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
    if model_only:
        state = state["model"]
    elif (path / layout.META).exists():
        meta, error = validate.read_meta(path)
        if error is not None:
            raise error
        state.update(step=meta["step"], extra=meta["extra"], scheduler=meta["scheduler"])
    else:
        return state
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
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
    except CheckpointError as e:
        print(f"mano-consolidate: error: {e}", file=sys.stderr)
        return 1
    tensors, numel = _count(state.get("model", state) if not args.model_only else state)
    step = "" if args.model_only else f" from step {state.get('step')}"
    print(f"wrote {args.out}: model has {tensors} tensors, {numel} elements{step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
