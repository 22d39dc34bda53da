"""Spawn a process group on this machine and collect each rank's result (tests, benchmarks).

Follows shared/notes/platform.md: fresh child processes (no fork of the caller), a ``file://``
store in the test's tmp dir, a 60 s process-group timeout, each child's traceback written to a
file (so a failure on rank 1 is reported, not just "exit code 1"), ``os._exit`` after teardown
(avoids a rare SIGABRT at interpreter exit), and an outer timeout that kills every rank so a
hang fails the test instead of the CI job.

Children come from a ``forkserver``: a server process, itself started fresh, imports torch and
mano_dist once (and runs nothing: no threads, no process group, no CUDA) and forks each child
from that state. A spawned child spent ~3-4 s on 2 cores importing torch; a forked one starts
in ~0.1 s (``MANO_START_METHOD=spawn`` restores spawning). A child gets the caller's current
environment (the server's would date from when it started). The backend is gloo (CPU); pass
``backend="nccl"`` with one GPU per rank on a CUDA machine.

Usage::

    def _body(rank, world_size, shape):      # module level, so the child can import it
        ...
        return {"param": tensor}              # anything torch.save can write

    results = run_distributed(_body, 2, tmp_path, (5, 3))   # list indexed by rank
"""

from __future__ import annotations

import datetime
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


# What the fork server imports once for every child it forks (nothing that starts threads or
# reads the environment at import: each child sets its own environment after the fork).
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "mano_dist"]


def _context():
    method = os.environ.get("MANO_START_METHOD", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server starts
    return ctx


def _child(fn, rank, world_size, init_file, out_dir, args, env, backend):
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    code = 0
    try:
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            result = fn(rank, world_size, *args)
            torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tmp_path: pathlib.Path,
    *args,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return their results."""
    tmp_path = pathlib.Path(tmp_path)
    run_dir = tmp_path / f"dist-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    init_file = run_dir / "store"
    ctx = _context()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", **(env or {})}
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, str(init_file), str(run_dir), args, env, backend), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {
        r: (run_dir / f"error{r}.txt").read_text()
        for r in range(world_size)
        if (run_dir / f"error{r}.txt").exists()
    }
    if errors or hung:
        lines = [f"rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
        if hung:
            lines.append(f"ranks {hung} did not finish within {timeout:.0f} s (hang) and were killed")
        raise AssertionError("\n".join(lines))
    bad_exit = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad_exit:
        raise AssertionError(f"ranks exited abnormally (rank, exit code): {bad_exit}")
    return [torch.load(run_dir / f"result{r}.pt", weights_only=False) for r in range(world_size)]
