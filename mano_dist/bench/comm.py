"""Optimizer communication per step under FSDP2: Mano vs Muon vs Dion-style vs AdamW.

Builds LLaMA-1.3B transformer blocks (hidden 2048, FFN 5461: 7 matrices each) as ``nn.Linear``
layers, wraps each with ``fully_shard`` on a gloo mesh of 2 and 4 ranks, gives them seeded
gradients and counts, with :class:`mano_dist.comm.CollectiveCounter`, every collective issued
inside ``optimizer.step()``:

- Mano (v2, the default): two steps, so both axes are covered (axis 0 sharded, axis 1 local);
- ``torch.optim.Muon`` on the same DTensors (DTensor gathers the matrices for Newton-Schulz);
- AdamW: elementwise, no collectives;
- Dion-style distributed Muon: computed, not run (two all-to-alls of every matrix per step,
  bf16), the most economical way to give Newton-Schulz whole matrices.

"Per rank" is what one rank sends with a bandwidth-optimal (ring) algorithm: all-reduce
2(w-1)/w x payload, all-gather/all-to-all (w-1)/w x payload. Also times ``step()`` of Mano and
AdamW at world size 2 on the same sharded block. Usage::

    python -m mano_dist.bench comm [--blocks 1] [--world-sizes 2 4] [--muon-steps 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

HIDDEN, FFN, LAYERS = 2048, 5461, 24
BLOCK_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]  # [out, in]


def _block_model(blocks: int) -> nn.Module:
    return nn.ModuleList(nn.Linear(i, o, bias=False) for _ in range(blocks) for (o, i) in BLOCK_SHAPES)


def _set_grads(model, seed: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=gen) * 1e-3
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)


def _measure(rank, world_size, blocks, muon_steps, time_steps):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mano_dist import CollectiveCounter, Mano

    torch.manual_seed(0)
    model = _block_model(blocks)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    optimizers = {
        "mano": Mano(model.parameters(), lr=1e-3, nonfinite="ignore"),
        "mano+skip": Mano(model.parameters(), lr=1e-3),
        "adamw": torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
    }
    out = {name: {"records": [], "times": []} for name in optimizers}
    # Counted steps (two: both Mano axes) and timed steps are separate: the counter is a
    # Python dispatch mode that sees every op, which would inflate the time of the
    # optimizer that issues more (smaller) ops. Timed steps are interleaved so every optimizer
    # sees the same machine load, after a barrier so no rank's lateness is timed as comm.
    timed = 2 * max(1, time_steps // 2)
    for step in range(1 + 2 + timed):
        for name, opt in optimizers.items():
            _set_grads(model, step)
            dist.barrier()
            if 1 <= step <= 2:
                with CollectiveCounter() as cc:
                    opt.step()
                out[name]["records"].append(([c.kind for c in cc.calls], cc.bytes(), cc.wire_bytes()))
                continue
            t0 = time.perf_counter()
            opt.step()
            if step > 2:  # step 0 is warm-up
                out[name]["times"].append(time.perf_counter() - t0)
    if muon_steps and hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon(model.parameters(), lr=1e-3)
        out["muon"] = {"records": [], "times": []}
        for step in range(muon_steps):
            _set_grads(model, step)
            with CollectiveCounter() as cc:
                muon.step()
            out["muon"]["records"].append(([c.kind for c in cc.calls], cc.bytes(), cc.wire_bytes()))
    out["elements"] = sum(p.numel() for p in model.parameters())
    return out


def _dion_wire_bytes(elements: int, world_size: int) -> float:
    """Two all-to-alls of every matrix per step in bf16; each rank sends (w-1)/w of its share."""
    return 2 * (world_size - 1) / world_size * (elements / world_size) * 2


def _mib(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mano_dist.bench comm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1, help="LLaMA-1.3B blocks to build (the model has 24)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--muon-steps", type=int, default=1, help="0 skips Muon (slow on CPU)")
    ap.add_argument("--time-steps", type=int, default=4)
    args = ap.parse_args(argv)

    from mano_dist.multiprocess import run_distributed

    scale = LAYERS / args.blocks
    print(f"LLaMA-1.3B blocks x{args.blocks} (hidden {HIDDEN}, FFN {FFN}), fp32, FSDP2 Shard(0), gloo; "
          f"per-model figures = x{scale:g} (24 blocks). Optimizer traffic inside step(), averaged per step.")
    header = f"{'ws':>3} {'optimizer':<18}{'calls/step':>11}{'kinds':>28}{'payload MiB':>13}{'per-rank MiB':>14}{'model MiB/rank':>16}"
    print(header)
    mano_per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ws in args.world_sizes:
            res = run_distributed(_measure, ws, tmp, args.blocks, args.muon_steps, args.time_steps,
                                  timeout=3600, env={"OMP_NUM_THREADS": "1"})[0]
            for name in ("mano", "mano+skip", "adamw", "muon"):
                if name not in res:
                    continue
                recs = res[name]["records"]
                calls = statistics.mean(len(r[0]) for r in recs)
                kinds = ",".join(sorted({k for r in recs for k in r[0]})) or "-"
                payload = statistics.mean(r[1] for r in recs)
                wire = statistics.mean(r[2] for r in recs)
                if name == "mano":
                    mano_per_step[ws] = wire
                print(f"{ws:>3} {name:<18}{calls:>11.1f}{kinds:>28}{_mib(payload):>13}{_mib(wire):>14}{_mib(wire * scale):>16}")
            dion = _dion_wire_bytes(res["elements"], ws)
            print(f"{ws:>3} {'dion (computed)':<18}{2:>11}{'all_to_all':>28}{_mib(2 * res['elements'] * 2 / ws):>13}"
                  f"{_mib(dion):>14}{_mib(dion * scale):>16}")
            t_m, t_a = (statistics.median(res[n]["times"]) for n in ("mano", "adamw"))
            print(f"    step time at ws {ws} (median, interleaved): Mano {t_m * 1e3:.1f} ms, "
                  f"AdamW {t_a * 1e3:.1f} ms, Mano/AdamW {t_m / t_a:.2f}x")

    # Extrapolation: Mano's statistics do not grow with the world size; the others' shares do.
    elements_model = sum(o * i for o, i in BLOCK_SHAPES) * LAYERS
    stats = 3 * sum(i for _, i in BLOCK_SHAPES) * LAYERS * 4 / 2  # axis-0 steps only, per step
    print("\nextrapolated per-rank optimizer traffic per step, full 1.3B model (24 blocks), MiB:")
    print(f"{'ranks':>6}{'Mano':>10}{'Dion a2a':>12}{'Muon gather*':>14}{'AdamW':>8}")
    muon_gathers = None
    if "muon" in res and args.muon_steps:
        # all-gathers counted per matrix per step at the last measured world size
        muon_gathers = res["muon"]["records"][0][1] / (sum(o * i for o, i in BLOCK_SHAPES) * args.blocks * 4)
    for w in (64, 128, 256, 512, 1024):
        mano = 2 * (w - 1) / w * stats
        dion = _dion_wire_bytes(elements_model, w)
        muon = (w - 1) / w * elements_model * 4 * muon_gathers if muon_gathers else float("nan")
        print(f"{w:>6}{_mib(mano):>10}{_mib(dion):>12}{_mib(muon):>14}{0:>8}")
    if muon_gathers:
        print(f"* Muon: {muon_gathers:.1f} full-matrix payloads gathered per matrix per step (measured), fp32")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
