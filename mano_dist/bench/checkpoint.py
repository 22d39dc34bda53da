"""Checkpoint cost: how long training is blocked by a sync save vs an async save, the cost of
the checksums, and the load time, on one LLaMA-1.3B-shaped block (7 matrices, ~50M params) under
FSDP2 at world size 2 (gloo, CPU) with Mano. All numbers come from the same run. Usage::

    python -m mano_dist.bench checkpoint [--blocks 1] [--world-size 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from torch import nn

HIDDEN, FFN = 2048, 5461
BLOCK_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]  # [out, in]


def _measure(rank, world_size, blocks, repeats, folder):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mano_dist import Mano
    from mano_dist.checkpoint import Checkpointer

    model = nn.ModuleList(nn.Linear(i, o, bias=False) for _ in range(blocks) for (o, i) in BLOCK_SHAPES)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    opt = Mano(model.parameters(), lr=1e-3)
    sync = Checkpointer(os.path.join(folder, "sync"), keep_last=1)
    nosum = Checkpointer(os.path.join(folder, "nosum"), keep_last=1, checksums=False)
    asyn = Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
    times = {"sync": [], "sync_no_checksums": [], "async_blocking": [], "async_total": [], "load": []}

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    for i in range(repeats):
        times["sync"].append(timed(lambda: sync.save(i, model=model, optimizer=opt)))
        times["sync_no_checksums"].append(timed(lambda: nosum.save(i, model=model, optimizer=opt)))
        dist.barrier()
        t0 = time.perf_counter()
        asyn.save(i, model=model, optimizer=opt)
        times["async_blocking"].append(time.perf_counter() - t0)
        asyn.wait()
        times["async_total"].append(time.perf_counter() - t0)
        times["load"].append(timed(lambda: sync.load(model=model, optimizer=opt)))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sync.latest()) for f in fs)
    return {k: statistics.median(v) for k, v in times.items()} | {"bytes": size}


def main(argv=None) -> None:
    from mano_dist.multiprocess import run_distributed

    parser = argparse.ArgumentParser(prog="python -m mano_dist.bench checkpoint", description=__doc__)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    params = args.blocks * sum(o * i for o, i in BLOCK_SHAPES)
    with tempfile.TemporaryDirectory() as tmp:
        r = run_distributed(_measure, args.world_size, tmp, args.blocks, args.repeats, tmp, timeout=1200)[0]
    print(f"{params / 1e6:.1f}M params (fp32, + momentum), FSDP2 world size {args.world_size}, "
          f"checkpoint {r['bytes'] / 2**20:.0f} MiB, median of {args.repeats}")
    print(f"  sync save                  {r['sync']:7.2f} s   (with checksums)")
    print(f"  sync save, no checksums    {r['sync_no_checksums']:7.2f} s   -> checksums add "
          f"{r['sync'] / r['sync_no_checksums']:.2f}x")
    print(f"  async save, blocking part  {r['async_blocking']:7.2f} s   -> blocks training "
          f"{r['sync'] / r['async_blocking']:.1f}x less than sync")
    print(f"  async save, until complete {r['async_total']:7.2f} s")
    print(f"  load (checks + DCP + set)  {r['load']:7.2f} s")
