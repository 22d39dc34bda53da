"""Mano under DeepSpeed ZeRO: optimizer memory and step time against its peers on the same partitions.

``python -m mano_dist.bench memory --engine deepspeed [--world-size 2] [--width 1024] [--layers 8]``
builds a stack of ``layers`` square matrices (all Mano matrices) on ``world-size`` gloo ranks and,
per ZeRO stage, trains it with Mano and with a peer from the JSON config:

- stages 1-3: AdamW (``torch.optim.AdamW``, ``"torch_adam": true``) on the same flat partitions;
- stages 2-3 with ``"offload_optimizer": {"device": "cpu"}``: DeepSpeed's ``DeepSpeedCPUAdam``
  (what ``"type": "AdamW"`` builds under offload), the optimizer an offload user has today.

Per run it reports, on rank 0, after warm-up steps:
- persistent bytes per partition element: every tensor reachable from the optimizer object
  (state, caches, layouts) other than the flat params and their grads, over the partition size;
- the step's transient peak: the resident-set high-water mark during the optimizer's ``step()``
  calls above the level just before each (``VmHWM`` reset through ``/proc/self/clear_refs``;
  glibc returns blocks >= 64 KiB to the kernel at once, so freed temporaries do not linger);
- the optimizer's step time: the wall time of its ``step()`` calls (ZeRO's own gradient
  reduction, norm and parameter all-gather excluded; the ranks meet at a barrier before each
  call, so Mano's statistics all-reduce does not absorb another rank's lateness), the fastest
  of the timed steps (on a shared machine the least disturbed one) and their median.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import pathlib
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from .proc_memory import peak_bytes, reset_peak, resident_bytes  # the same counters as the dense bench

PEERS = {"adamw": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
         "cpuadam": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}
MANO = {"type": "Mano", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, "nonfinite": "ignore"}}
# Under offload also Mano's eager passes (fused_cpu off), the step before mano_dist/deepspeed/fused_cpu.py.
MANO_EAGER = {"type": "Mano", "params": {**MANO["params"], "fused_cpu": False}}
# (stage, offload, peer)
CASES = [(1, False, "adamw"), (2, False, "adamw"), (3, False, "adamw"), (2, True, "cpuadam"), (3, True, "cpuadam")]


class MatrixStack(nn.Module):
    """``layers`` square matrices, residual tanh: every param is a Mano matrix."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x.square().mean()


def ds_config(stage: int, offload: bool, optimizer: dict, micro: int = 4) -> dict:
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "optimizer": optimizer, "zero_optimization": zero}


def _tensors_reachable(obj, seen: set, found: dict, depth: int = 0) -> None:
    """Every tensor held by ``obj`` through containers and mano_dist / torch.optim / DeepSpeed-op
    objects (by storage, each once)."""
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        if obj.numel():
            found.setdefault(obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        return
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif type(obj).__module__.startswith(("mano_dist", "torch.optim", "deepspeed.ops")):
        items = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        if dataclasses.is_dataclass(obj):
            items += [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        return
    for item in items:
        _tensors_reachable(item, seen, found, depth + 1)


def persistent_bytes_per_element(optimizer, partitions: list) -> float:
    """Bytes of every tensor ``optimizer`` keeps other than the flat ``partitions`` it steps on
    and their grads, per partition element."""
    excluded = {t.untyped_storage().data_ptr() for p in partitions for t in (p, p.grad)
                if t is not None and t.numel()}
    found: dict[int, int] = {}
    _tensors_reachable(optimizer, set(), found)
    held = sum(nbytes for ptr, nbytes in found.items() if ptr not in excluded)
    return held / max(1, sum(p.numel() for p in partitions))


class StepProbe:
    """Wraps ``optimizer.step``: per engine step, the summed wall time of its calls and the
    largest resident-set rise during one of them."""

    def __init__(self, optimizer):
        self.seconds, self.peak = 0.0, 0
        inner = optimizer.step

        def step(*args, **kwargs):
            if dist.is_initialized():  # time this rank's step, not the other ranks' lateness
                dist.barrier()
            before = resident_bytes()
            reset_peak()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.peak = max(self.peak, peak_bytes() - before)
            return out

        optimizer.step = step

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.peak)
        self.seconds, self.peak = 0.0, 0
        return out


def measure(stage: int, offload: bool, optimizer: dict, width: int, layers: int, steps: int, rank: int) -> dict:
    """One engine: persistent bytes/element, transient peak and median step time of its optimizer."""
    import deepspeed

    import mano_dist.deepspeed  # noqa: F401 - registers "Mano"
    from mano_dist.deepspeed.zero_metadata import flat_partitions

    torch.manual_seed(0)
    model = MatrixStack(width, layers)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, offload, optimizer))
    partitions = [part.flat for part in flat_partitions(engine.optimizer)]
    probe = StepProbe(engine.basic_optimizer)
    g = torch.Generator().manual_seed(rank)
    times, peaks = [], []
    for step in range(steps + 2):  # two warm-up steps: state exists, both rotation axes seen
        engine.backward(engine(torch.randn(4, width, generator=g)))
        engine.step()
        seconds, peak = probe.take()
        if step >= 2:
            times.append(seconds)
            peaks.append(peak)
    out = {"optimizer": type(engine.basic_optimizer).__name__,
           "bytes_per_element": persistent_bytes_per_element(engine.basic_optimizer, partitions),
           "peak": max(peaks), "seconds": min(times), "median_seconds": statistics.median(times)}
    engine.destroy()
    return out


def _body(rank, world_size, width, layers, steps, cases):
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed temporaries leave at once
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    results = {}
    for stage, offload, peer in cases:
        engines = (("mano", MANO), (peer, PEERS[peer])) + ((("mano_eager", MANO_EAGER),) if offload else ())
        for name, opt in engines:
            results[(stage, offload, name)] = measure(stage, offload, opt, width, layers, steps, rank)
    return results


def run(world_size: int, width: int, layers: int, steps: int, cases=CASES, threads: int = 1) -> dict:
    """``threads``: OpenMP threads per rank, the same for every optimizer (``DeepSpeedCPUAdam``'s
    OpenMP loop, PyTorch's intra-op pool and Mano's compiled kernels all read OMP_NUM_THREADS)."""
    from mano_dist.multiprocess import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_body, world_size, pathlib.Path(tmp), width, layers, steps, list(cases),
                               env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}, timeout=1800)[0]


def _ratio(mano: float, peer: float) -> str:
    """A peak ratio, or '-' where the peer's peak is below one MiB (in-place kernels; the ratio
    of two page-granular noise levels means nothing)."""
    return f"{mano / peer:>6.2f}x" if peer >= 2**20 else f"{'-':>7}"


def _eager_note(e: dict, peer: dict) -> str:
    return (f"; eager Mano {e['seconds'] * 1e3:.1f} ms = {e['seconds'] / peer['seconds']:.2f}x "
            f"({e['median_seconds'] * 1e3:.1f} median)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mano_dist.bench memory --engine deepspeed",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps after 2 warm-up steps")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank (all optimizers alike)")
    ap.add_argument("--offload-only", action="store_true", help="only the ZeRO-Offload cases")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cases = [c for c in CASES if c[1] or not args.offload_only]
    res = run(args.world_size, args.width, args.layers, args.steps, cases, args.threads)
    print(f"DeepSpeed ZeRO, {args.world_size} ranks x {args.threads} threads, {args.layers} matrices "
          f"{args.width}x{args.width} ({args.layers * args.width**2 * 4 / 2**20:.0f} MiB fp32); rank 0; "
          f"step: fastest (median) of {args.steps}")
    print(f"{'stage':<6}{'offload':<8}{'peer':<17}{'B/elt Mano':>11}{'peer':>6}{'ratio':>7}"
          f"{'peak MiB Mano':>14}{'peer':>7}{'ratio':>7}{'step ms Mano':>13}{'peer':>8}{'ratio':>7}")
    for stage, offload, peer in cases:
        m, p = res[(stage, offload, "mano")], res[(stage, offload, peer)]
        print(f"{stage:<6}{'cpu' if offload else '-':<8}{p['optimizer']:<17}"
              f"{m['bytes_per_element']:>11.2f}{p['bytes_per_element']:>6.2f}"
              f"{m['bytes_per_element'] / p['bytes_per_element']:>6.2f}x"
              f"{m['peak'] / 2**20:>14.1f}{p['peak'] / 2**20:>7.1f}{_ratio(m['peak'], p['peak'])}"
              f"{m['seconds'] * 1e3:>13.1f}{p['seconds'] * 1e3:>8.1f}{m['seconds'] / p['seconds']:>6.2f}x"
              f"  ({m['median_seconds'] * 1e3:.1f} / {p['median_seconds'] * 1e3:.1f} ms median)"
              + (_eager_note(res[(stage, offload, "mano_eager")], p) if offload else ""))
    print("B/elt: optimizer-held bytes per partition element (flat params and grads excluded); peak: "
          "resident-set rise during the optimizer's step() calls; step: their wall time")


if __name__ == "__main__":
    main()
