"""Preemption: a signal asks the run to stop, and it stops at the next step boundary with a
complete checkpoint, so the requeued job (``--resume auto``) continues exactly where it stopped.

Who sends what: SLURM sends the signal ``#SBATCH --signal`` names (``launch/slurm.sbatch``: TERM,
120 s before the time limit) and TERM when it preempts or cancels; torchrun's agent, on SIGTERM
(or any signal of its ``--signals-to-handle``), forwards that signal to every worker and SIGKILLs
the ones still alive after its shutdown timeout (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by
default: ``launch/run.sh`` raises it, since a large model's checkpoint takes longer).

Why the handlers only record the signal: Python runs a handler on the main thread between two
bytecodes, which may be in the middle of a collective or a checkpoint write; doing either from
the handler would interleave with the one in flight. The run acts on the flag at the next step
boundary, where ``Preemption.agreed()`` makes every rank agree with one all-reduce (MAX) of the
recorded signal number: a signal that reached some ranks only stops all of them at the same step,
and no rank waits in a collective its peers skipped. A second signal changes nothing (SLURM and
torchrun's agent may both deliver one): the run still stops at the boundary.

Cost: one 4-byte all-reduce per step, of a flag in host memory (a numpy array seen as a CPU
tensor, read as numpy, so no tensor is read on the host), over gloo: the default group on CPU
runs, a gloo group made for it on CUDA. The step boundary therefore never waits for the GPU (an
NCCL all-reduce read on the host would drain the GPU's queue every step); the hosts of all ranks
meet there, which their queued collectives make them do within a step anyway.

Exit code: a run that stopped for a signal exits with ``PREEMPTED_EXIT_CODE`` (75, sysexits'
EX_TEMPFAIL, "try again later"; distinct from 0, from 1 (an exception), 2 (a refused config or
folder) and 128 + N (killed by signal N)). torchrun does not pass a worker's exit code through: it
exits 1 whenever a worker fails (its summary lists each worker's code) and when it got a signal
itself. So every worker that stops this way also writes the file named by ``MANO_PREEMPTED_FILE``
when that is set; ``launch/run.sh`` sets a fresh path per launch and exits 75 when the file is
there, and ``launch/slurm.sbatch`` requeues the job on 75.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped for a signal after saving; resume it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER_ENV = "MANO_PREEMPTED_FILE"  # set by launch/run.sh: tells it this launch was preempted


class Preemption:
    """Signal handlers that record SIGTERM / SIGUSR1 (``received``), and the per-step agreement.
    A context manager: the previous handlers come back on exit (``launch.trainer.loop.main`` runs
    in-process in tests and tools)."""

    def __init__(self):
        self.received = 0  # the first signal this process got, 0 for none
        self._previous: dict[int, object] = {}
        self._flag = np.zeros(1, dtype=np.int32)
        self._tensor = torch.from_numpy(self._flag)
        self._group = None

    def connect(self, device: torch.device) -> None:
        """Once the process group exists: on CUDA (NCCL) a gloo group for the flag, so that it is
        reduced off the GPU; CPU runs' default group is gloo already. Collective on CUDA."""
        if dist.is_initialized() and device.type != "cpu":
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> Preemption:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if not self.received:
            self.received = signum

    def agreed(self) -> int:
        """The signal some rank got (the largest number if several), 0 if none did; the same on
        every rank. Collective: every rank calls it at every step boundary."""
        self._flag[0] = self.received
        if dist.is_initialized():
            dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self._group)
        return int(self._flag[0])


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def clear_marker() -> None:
    """At start: a marker left by an earlier attempt of this launch (torchrun restarted the
    workers, which then finished) must not make launch/run.sh report a preemption."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).unlink(missing_ok=True)


def write_marker(step: int, signum: int) -> None:
    """Tell launch/run.sh that this launch stopped for a signal (each worker writes it; the
    content is the same, and the rename makes each write whole)."""
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        return
    part = Path(f"{marker}.{os.getpid()}.partial")
    part.write_text(f"preempted by {signal_name(signum)} after step {step}\n")
    os.replace(part, marker)
