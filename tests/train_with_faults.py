"""Test-only entry point: ``launch.train`` with a fault injected, a lost node.

    torchrun ... tests/train_with_faults.py --crash-at-step 5 [--crash-rank 1] <launch.train arguments>

After step N is logged and saved, the chosen rank (every rank by default) SIGKILLs itself, as a
node that loses power would: no exception, no cleanup. Only a run that started from scratch
crashes, so a worker restarted by ``torchrun --max-restarts`` and resuming from a checkpoint
runs through. The real trainer reads no such setting: a leftover variable cannot kill a run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import train  # noqa: E402


def crash_after(step: int, rank: int | None):
    def callback(trainer, done: int) -> None:
        if trainer.start == 0 and done == step and rank in (None, trainer.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--crash-at-step", type=int, required=True)
    ap.add_argument("--crash-rank", type=int, default=None)
    faults, rest = ap.parse_known_args(argv)
    return train.main(rest, callbacks=[crash_after(faults.crash_at_step, faults.crash_rank)])


if __name__ == "__main__":
    train.exit_now(main())
