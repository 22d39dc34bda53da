"""Names inside a checkpoint folder, and which step folders are complete.

    <folder>/step-N/            a complete checkpoint (renamed from step-N.tmp once every rank wrote)
        .metadata, *.distcp     DCP files: {"model": ..., "optim": ...}, sharded
        checkpointer.pt         step, extra, scheduler state, world size (written by rank 0)
        rng/rank-R.pt           RNG states of rank R
        manifest.json           size and CRC-32 of every file above (written by rank 0 at the end)
        COMPLETE                written last, just before the rename
    <folder>/step-N.tmp/        a save in progress, or one killed midway: never loaded
"""

from __future__ import annotations

import re
from pathlib import Path

STEP_PREFIX = "step-"
TMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".deleting"
COMPLETE = "COMPLETE"
META = "checkpointer.pt"
MANIFEST = "manifest.json"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"

_STEP_RE = re.compile(rf"^{re.escape(STEP_PREFIX)}(\d+)$")


def step_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"{STEP_PREFIX}{int(step)}"


def tmp_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"{STEP_PREFIX}{int(step)}{TMP_SUFFIX}"


def rng_file(path: Path, rank: int) -> Path:
    return Path(path) / RNG_DIR / f"rank-{rank}.pt"


def step_of(path: Path) -> int | None:
    """N for a folder named step-N, else None (temporary and trashed folders are not steps)."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete step folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step_of(p), p) for p in folder.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None and is_complete(p))
