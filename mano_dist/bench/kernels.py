"""The kernels a GPU would run for ``Mano(fused=True)``'s step, scheduled on a machine without one.

Inductor decides which operations share a kernel in its scheduler, before it generates any
code. With ``cpu_backend="triton"`` a CPU graph goes through Triton's scheduling, and with the
device properties it reads (SM count, threads per SM, architecture) patched to a named GPU's,
its split-reduction and fusion choices are those it makes for that GPU. This command builds a
step's batches the way the optimizer does (``fused_driver.make_batches``, planned for
``cuda``), compiles each segment up to the scheduler (generating Triton code would need a GPU
driver) and prints, per step, the kernels and the bytes they move per element: inductor's own
estimate, which counts each buffer a kernel reads or writes once. A kernel that sums rows and
then updates them reads them twice; the second read is from cache where the rows still fit, so
its DRAM traffic lies between the count and the count plus its reads. The peer is the compiled
AdamW fallback (``fused.fused_adamw``), scheduled the same way. Nothing here is timed, and
what Triton then generates is not checked: a GPU's speed needs ``bench gpu``. Usage::

    python -m mano_dist.bench kernels [--model 130m] [--variants v2 v1 both] [--shards 8] [--gpu h100]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import types
from dataclasses import dataclass
from unittest import mock

import torch

from mano_dist import fused
from mano_dist.fused_driver import BATCH_MATRICES, make_batches
from mano_dist.functional import STATS_DTYPE, adamw_step

from .step import llama_matrix_shapes


@dataclass(frozen=True)
class Kernel:
    """One kernel of a scheduled graph: inductor's node name and the bytes it reads and writes."""

    name: str
    nbytes: int


# What inductor's scheduling reads of a device (``DeviceProperties``): its split-reduction and
# tiling heuristics depend on the SM count, threads per SM, warp size and architecture. On a CPU
# device it would read the host's core count, so the plans are made for one of these instead
# (public figures: H100/H200 SXM 132 SMs, A100 108, L4 58).
GPUS = {
    "h100": dict(multi_processor_count=132, cc=90, major=9),
    "a100": dict(multi_processor_count=108, cc=80, major=8),
    "l4": dict(multi_processor_count=58, cc=89, major=8),
}


def device_properties(gpu: str):
    from torch._inductor.runtime.hints import DeviceProperties

    return DeviceProperties(type="cuda", index=0, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048
                            if gpu != "l4" else 1536, max_threads_per_block=1024, warp_size=32, **GPUS[gpu])


class _Scheduled(Exception):
    """Raised from inside inductor once the kernels are known: nothing is generated or run."""


def scheduled_kernels(fn, *args, gpu: str = "h100") -> list[Kernel]:
    """The kernels inductor's Triton scheduling makes of ``fn(*args)`` for ``gpu``, compiled
    whole (``fullgraph``) from CPU tensors; views and concatenations into place are not kernels."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("mano_dist.bench.kernels needs triton (pip install triton, or mano-dist[torchtitan])")
    from torch._inductor.runtime.hints import DeviceProperties

    found: list[list[Kernel]] = []
    props = device_properties(gpu)

    def codegen(scheduler):
        found.append([Kernel(n.get_name(), n.get_read_write_buffers_sizes()) for n in scheduler.nodes
                      if not isinstance(n, NopKernel)])
        raise _Scheduled

    from torch._inductor import config, scheduler
    NopKernel = scheduler.NopKernelSchedulerNode
    # A code object of its own: dynamo caches nothing for a failed compile, but counts them.
    code = fn.__code__.replace(co_name=f"{fn.__name__}__scheduled")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    with config.patch(cpu_backend="triton", fx_graph_cache=False), \
            mock.patch.object(scheduler.Scheduler, "codegen", codegen), \
            mock.patch.object(DeviceProperties, "create", classmethod(lambda cls, device: props)), \
            _quiet("torch._inductor", "torch._dynamo"):
        try:
            torch.compile(fresh, fullgraph=True, dynamic=False)(*args)
        except Exception:  # noqa: BLE001 - _Scheduled arrives wrapped by dynamo
            if not found:
                raise
    return found[-1]


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The compiler's loggers at ERROR: each stopped compile would log that it failed."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class _Group:
    key: tuple


@dataclass
class PlannedLayout:
    """What ``make_batches`` asks of a layout, for matrices whose ``sharded`` axes are split
    over ranks (FSDP2's Shard(0): axis 0; TP's rowwise Shard(1): axis 1)."""

    global_shape: tuple[int, int]
    sharded: tuple[int, ...] = ()

    def reduce_groups(self, axis: int) -> list:
        return [_Group(("planned", axis))] if axis in self.sharded else []


@dataclass(frozen=True)
class SegmentPlan:
    """One compiled segment of a batch: its reductions ``[start, stop)``, whether it writes
    M and W, and its kernels."""

    start: int
    stop: int
    final: bool
    kernels: tuple[Kernel, ...]


def step_plans(variant: str, axis: int, shape: tuple[int, int], sharded: tuple[int, ...] = (),
               local_rows: int | None = None, matrices: int = BATCH_MATRICES, checks: bool = True,
               gpu: str = "h100") -> list[SegmentPlan]:
    """The segments (and kernels) of one batch of ``matrices`` like matrices of global
    ``shape`` holding ``local_rows`` rows each, for a step reducing along ``axis``, as a CUDA
    device would compile them; ``checks``: the step may be skipped (the default ``nonfinite``)."""
    rows = shape[0] if local_rows is None else local_rows
    group = dict(variant=variant, momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-8)
    mats = [(*(torch.zeros(rows, shape[1]) for _ in range(3)), PlannedLayout(shape, sharded)) for _ in range(matrices)]
    (batch,) = make_batches(group, mats, 1e-3, axis, checks, device_type="cuda")
    axes = fused.stage_axes(variant, axis)
    stats = fused.stage_statistics(variant)
    plans = []
    for spec in batch.specs:
        knowns = [torch.zeros(stats * sum(w.shape[1 - ax] for w in batch.ws), dtype=STATS_DTYPE)
                  for ax in axes[: spec.start]]
        # As the driver runs them: the checking segment before the decision, the rest gated.
        skip = torch.zeros((), dtype=torch.bool) if checks and not spec.check else None
        kernels = scheduled_kernels(fused.run_segment, batch.ws, batch.gs, batch.ms, knowns, batch.lr, skip, spec, gpu=gpu)
        plans.append(SegmentPlan(spec.start, spec.stop, spec.final, tuple(kernels)))
    return plans


def adamw_kernels(shape: tuple[int, int], matrices: int = BATCH_MATRICES, gpu: str = "h100") -> list[Kernel]:
    """The compiled AdamW fallback's kernels for ``matrices`` tensors of ``shape``, gated."""
    params, grads, exp_avgs, exp_avg_sqs = ([torch.zeros(shape) for _ in range(matrices)] for _ in range(4))
    steps = [torch.zeros((), dtype=torch.float64) for _ in range(matrices)]

    def call(params, grads, exp_avgs, exp_avg_sqs, steps, lr, skip):
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr.reshape(()), skip=skip,
                   beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    return scheduled_kernels(call, params, grads, exp_avgs, exp_avg_sqs, steps,
                             fused.lr_tensor(1e-3, torch.device("cpu")), torch.zeros((), dtype=torch.bool), gpu=gpu)


def check_kernels(shape: tuple[int, int], matrices: int = BATCH_MATRICES, gpu: str = "h100") -> list[Kernel]:
    """The non-finite check's kernels (``functional.any_nonfinite``) over ``matrices`` gradients."""
    from mano_dist.functional import any_nonfinite

    return scheduled_kernels(any_nonfinite, [torch.zeros(shape) for _ in range(matrices)], gpu=gpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mano_dist.bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="130m", choices=["130m", "350m", "1.3b"])
    parser.add_argument("--variants", nargs="+", default=["v2", "v1", "both"])
    parser.add_argument("--shards", type=int, default=8, help="FSDP2 ranks for the sharded layout")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="whose properties inductor plans for")
    args = parser.parse_args(argv)
    shapes = sorted(set(llama_matrix_shapes(args.model, 1)))
    print(f"Triton kernels per matrix and bytes per element of one step, {BATCH_MATRICES}-matrix batches "
          f"of the {args.model} shapes, as inductor schedules them for an {args.gpu.upper()} (counted, not timed; "
          "torch's fused AdamW moves 28 B/element)")
    for shape in shapes:
        elems = BATCH_MATRICES * shape[0] * shape[1]
        adamw, check = adamw_kernels(shape, gpu=args.gpu), check_kernels(shape, gpu=args.gpu)
        flag_bytes = sum(k.nbytes for k in check) / elems
        print(f"\n{shape[0]}x{shape[1]}: compiled AdamW fallback {len(adamw) / BATCH_MATRICES:.2f} kernels, "
              f"{sum(k.nbytes for k in adamw) / elems:.1f} B/element; the flag's check {flag_bytes:.1f} B/element")
        print(f"  {'variant':8s} {'layout':12s} {'axis':>4s} {'segments':>8s} {'kernels/matrix':>14s} "
              f"{'B/element':>9s}  checked by")
        for variant in args.variants:
            for layout, sharded, rows in (("dense", (), shape[0]),
                                          (f"FSDP2 x{args.shards}", (0,), -(-shape[0] // args.shards))):
                for axis in (0, 1):
                    plans = step_plans(variant, axis, shape, sharded, rows, gpu=args.gpu)
                    kernels = [k for p in plans for k in p.kernels]
                    nbytes = sum(k.nbytes for k in kernels) / (BATCH_MATRICES * rows * shape[1])
                    checked = "its statistics" if not plans[0].final else f"the flag (+{flag_bytes:.1f} B)"
                    print(f"  {variant:8s} {layout:12s} {axis:4d} {len(plans):8d} "
                          f"{len(kernels) / BATCH_MATRICES:14.2f} {nbytes:9.1f}  {checked}")

if __name__ == "__main__":
    main()
