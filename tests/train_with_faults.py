"""Test-only entry point: ``launch.train`` with a fault injected, a lost node or a preemption.

    torchrun ... tests/train_with_faults.py --crash-at-step 5 [--crash-rank 1] <launch.train arguments>
    torchrun ... tests/train_with_faults.py --signal-at-step 4 [--signal-to self|agent|launcher]
        [--signal-rank 1] [--signal-name TERM|USR1] <launch.train arguments>

``--crash-at-step N``: after step N is logged and saved, the chosen rank (every rank by default)
SIGKILLs itself, as a node that loses power would: no exception, no cleanup.

``--signal-at-step N``: after step N, rank ``--signal-rank`` (0 by default) sends the signal to
itself (``self``: the other ranks never get one), to torchrun's agent, its parent (``agent``:
the agent forwards it to every worker), or to the agent's parent (``launcher``: launch/run.sh,
which forwards it to the agent). Then each rank the signal is meant to reach waits until its
handler has recorded it, so the run stops at step N exactly (a forwarded signal would otherwise
arrive a step or two later, depending on the machine's load).

Only a run that started from scratch is hit, so a worker restarted by ``torchrun --max-restarts``
or a resumed run goes through. The real trainer reads no such setting: a leftover variable cannot
kill a run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.trainer import loop as train  # noqa: E402


def crash_after(step: int, rank: int | None):
    def callback(trainer, done: int) -> None:
        if trainer.start == 0 and done == step and rank in (None, trainer.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def _parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (field 4 of /proc/PID/stat, after the parenthesised name)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def signal_after(step: int, to: str, rank: int, signum: int):
    def callback(trainer, done: int) -> None:
        if trainer.start != 0 or done != step:
            return
        if trainer.rank == rank:
            target = {"self": os.getpid(), "agent": os.getppid(), "launcher": _parent_of(os.getppid())}[to]
            os.kill(target, signum)
        if to != "self" or trainer.rank == rank:
            deadline = time.monotonic() + 60
            while not trainer.preemption.received:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {trainer.rank}: no signal arrived 60 s after sending it to the {to}")
                time.sleep(0.01)

    return callback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--crash-at-step", type=int, default=None)
    ap.add_argument("--crash-rank", type=int, default=None)
    ap.add_argument("--signal-at-step", type=int, default=None)
    ap.add_argument("--signal-to", choices=("self", "agent", "launcher"), default="self")
    ap.add_argument("--signal-rank", type=int, default=0)
    ap.add_argument("--signal-name", default="TERM", choices=("TERM", "USR1"))
    faults, rest = ap.parse_known_args(argv)
    callbacks = []
    if faults.crash_at_step is not None:
        callbacks.append(crash_after(faults.crash_at_step, faults.crash_rank))
    if faults.signal_at_step is not None:
        callbacks.append(signal_after(faults.signal_at_step, faults.signal_to, faults.signal_rank,
                                      getattr(signal, f"SIG{faults.signal_name}")))
    if not callbacks:
        ap.error("give --crash-at-step or --signal-at-step")
    return train.main(rest, callbacks=callbacks)


if __name__ == "__main__":
    train.exit_now(main())
