"""A memory dry run: the trainer's real model, sharding, checkpointing, precision, micro-batch and
optimizer at the target world size, on fake tensors, in one process with no GPU.

How (the way large trainers estimate memory before a launch):

- torch's fake process group plays rank 0 of ``world`` ranks: collectives return at once and
  move nothing, so FSDP2 and tensor parallelism build their real local shards and buffers;
- ``FakeTensorMode``: every tensor has its shape, dtype and storage size but no data, so the
  1.3B model costs no memory and each op costs microseconds;
- the trainer's own ``build_model`` steps (``parallelize`` on the meta device, then
  ``init_weights``) build, shard, wrap and initialise the model; its ``FSDPEngine`` builds the
  optimizer; then one micro-step of the trainer (forward, loss, ``micro_backward``; when it
  accumulates, with the sharded gradients of earlier micro-steps live, as on the GPU) and the
  optimizer's real ``step()``, after the trainer's gradient clipping (which reads nothing on
  the host, so it runs on fake tensors as it is);
- :class:`PeakTracker` counts the bytes of every live tensor storage as ops create and free
  them, the way ``torch.cuda.max_memory_allocated`` counts the caching allocator's blocks.

What a fake CPU trace cannot see, and how it is accounted for:

- attention: on CPU ``scaled_dot_product_attention`` dispatches to
  ``_scaled_dot_product_flash_attention_for_cpu``, which, like CUDA's flash kernel, keeps the
  output and a fp32 log-sum-exp per (sequence, head, position) and never the (seq x seq) score
  matrix, so the bytes traced are the bytes flash keeps (CUDA's kernel adds a 16-byte RNG state);
- the CUDA context, NCCL's buffers and the caching allocator's fragmentation are not tensors:
  ``--reserve`` GiB (default 3.0; an assumption, not measured here) is added to the traced peak;
- host reads of values (Mano's cancellation and non-finite checks) have nothing to read: the
  optimizer takes the path that allocates most (see ``mano_dist.lockstep``);
- ``train.compile``: the blocks are traced eager, and the report says so. torch.compile cannot
  run here: dynamo skips every frame while a dispatch mode such as the tracker is active, and
  inductor's kernels would allocate outside it on real memory. Compiled blocks usually keep
  fewer intermediates, so for them the traced peak errs high.

Checked against real CPU runs of the same configuration: ``launch/studies/calibrate.py``.
"""

from __future__ import annotations

import copy
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from mano_dist.dtensors import local

GiB = 2**30
DEFAULT_RESERVE_GIB = 3.0
COMPILE_NOTE = ("note: train.compile = true is traced eager: torch.compile cannot run on the dry run's fake "
                "tensors under its dispatch modes (dynamo skips those frames; inductor's kernels need real memory), "
                "so this is the eager blocks' peak (compiled blocks usually keep less)")


class PeakTracker(TorchDispatchMode):
    """Live bytes of tensor storages, and their peak with the phase it happened in.

    A storage is counted when an op first returns a tensor on it, or when ``track`` is called
    on tensors made before the tracker started, and uncounted when it is freed; FSDP2 frees and
    re-allocates its all-gather buffers with ``UntypedStorage.resize_``, which no dispatch mode
    sees, so ``resize_`` is wrapped while the tracker is active.
    """

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}  # id of a live storage -> bytes counted
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.ops: set[str] = set()

    def track(self, tensors) -> None:
        for t in tensors:
            self._count(t)

    def _count(self, t: torch.Tensor) -> None:
        from torch.distributed._tools.common_utils import get_untyped_storages

        for st in get_untyped_storages(t):
            key = id(st)
            if key in self.sizes and self._refs[key]() is st:
                continue
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._freed(key))
            self._set(key, st.nbytes())

    def _set(self, key: int, nbytes: int) -> None:
        self.live += nbytes - self.sizes.get(key, 0)
        self.sizes[key] = nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor unwrap; its local ops come back here
        if func is torch.ops._c10d_functional.wait_tensor.default:
            res = args[0]  # the fake kernel returns a copy; on a GPU the wait returns its input
        else:
            res = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        tree_map_only(torch.Tensor, self._count, res)
        return res

    def __enter__(self):
        self._orig_resize = torch.UntypedStorage.resize_
        tracker, orig = self, self._orig_resize

        def resize_(st, size):
            out = orig(st, size)
            if id(st) in tracker.sizes:
                tracker._set(id(st), st.nbytes())
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)


def local_bytes(tensors) -> int:
    """Bytes of the local shards of ``tensors`` (DTensors count their ``to_local()``)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = local(t)
        total += t.numel() * t.element_size()
    return total


@dataclass
class DryRunResult:
    world: int
    dp: int
    tp: int
    micro_batch: int
    accumulation: int
    params: int  # bytes per rank, each category
    grads: int
    optimizer_state: int
    peak: int  # traced peak of live storages
    peak_phase: str
    attention_ops: tuple[str, ...]
    compile_traced_eager: bool = False  # train.compile was set; the eager blocks were traced

    @property
    def activations(self) -> int:
        """Everything else live at the peak: saved activations, FSDP2's unsharded parameters
        of the blocks in flight, logits, and the temporaries of the op that peaked."""
        return max(0, self.peak - self.params - self.grads - self.optimizer_state)


def measure_step(model, engine, cfg, micro: int, accumulation: int, tracker: PeakTracker,
                 real_micro_steps: bool = False) -> DryRunResult:
    """A micro-step of the trainer and the optimizer's step, under ``tracker``, on fake or real
    tensors. When the trainer accumulates, the micro-step traced is a later one, with the
    sharded gradients of the earlier ones live: zeros put there first, or (``real_micro_steps``,
    the calibration's real run) two real micro-steps."""
    from .parallel import clip_grad_norm

    opt = engine.optimizer
    params = list(model.parameters())
    tracker.track(params)
    tracker.track(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.autocast_bf16)
    gen = torch.Generator().manual_seed(0)
    if accumulation > 1 and not real_micro_steps:  # the earlier micro-steps' sharded gradients
        for p in params:
            p.grad = torch.zeros_like(p)
    for i in range(min(2, accumulation) if real_micro_steps else 1):
        tokens = torch.randint(0, cfg.model.vocab_size, (micro, cfg.data.seq_len + 1), generator=gen)
        tracker.phase = f"forward {i + 1}"
        with autocast:
            logits = engine.forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        tracker.phase = f"backward {i + 1}"
        engine.micro_backward(loss, accumulation, last=accumulation == 1)  # logits live, as in the trainer
        del logits, loss
    grads = local_bytes(p.grad for p in params)
    tracker.phase = "optimizer step"
    clip_grad_norm(params, cfg.optim.grad_clip)
    opt.step()
    state = local_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = cfg.parallel.tp
    return DryRunResult(
        world=world, dp=world // tp, tp=tp, micro_batch=micro, accumulation=accumulation,
        params=local_bytes(params), grads=grads, optimizer_state=state,
        peak=tracker.peak, peak_phase=tracker.peak_phase,
        attention_ops=tuple(sorted(o for o in tracker.ops if "attention" in o)))


def dry_run(cfg, world: int) -> DryRunResult:
    """Trace one optimizer step of ``cfg`` as rank 0 of ``world`` ranks (FSDP2 engine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..config import accumulation_steps
    from .engines import FSDPEngine
    from .model import Llama, init_weights
    from .parallel import build_mesh, parallelize

    cfg = copy.deepcopy(cfg)
    cfg.train.async_checkpoint = False  # its gloo side group cannot exist on the fake backend; host memory only
    traced_eager, cfg.train.compile = cfg.train.compile, False  # see the module docstring
    tp = cfg.parallel.tp
    dp = world // tp
    micro, accumulation = accumulation_steps(cfg, dp)
    if dist.is_initialized():
        raise RuntimeError("dry_run starts its own fake process group; destroy the current one first")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        # build_model's steps, split where DeviceMesh needs real tensors (it indexes its rank
        # map with data-dependent ops, which fake tensors refuse): the mesh and ``parallelize``
        # on the meta device outside FakeTensorMode, materialising and ``init_weights`` inside.
        mesh = build_mesh(torch.device("cpu"), world, tp)
        with torch.device("meta"):
            model = parallelize(Llama(cfg.model), mesh, cfg)
        with FakeTensorMode(allow_non_fake_inputs=True), PeakTracker() as tracker, \
                tempfile.TemporaryDirectory() as out:
            model.to_empty(device="cpu")
            init_weights(model, cfg.train.seed)
            result = measure_step(model, FSDPEngine(model, cfg, Path(out)), cfg, micro, accumulation, tracker)
    finally:
        dist.destroy_process_group()
    result.compile_traced_eager = traced_eager
    return result


def report(result: DryRunResult, gpu_mem_gib: float, reserve_gib: float = DEFAULT_RESERVE_GIB) -> tuple[list[str], bool]:
    """The table's lines and the verdict; the last line is the one scripts read."""
    r = result
    total = r.peak / GiB + reserve_gib
    fits = total <= gpu_mem_gib
    lines = [
        f"dry run on fake tensors: rank 0 of {r.world} (dp {r.dp} x tp {r.tp}), micro-batch {r.micro_batch} "
        f"x {r.accumulation} accumulation, attention kernel traced: {', '.join(r.attention_ops) or 'none'}",
        "  per rank, GiB:",
        f"    params (sharded, fp32 master)   {r.params / GiB:8.2f}",
        f"    grads (sharded)                 {r.grads / GiB:8.2f}",
        f"    optimizer state                 {r.optimizer_state / GiB:8.2f}",
        f"    activations + transients        {r.activations / GiB:8.2f}   (at the peak, during {r.peak_phase})",
        f"    traced peak                     {r.peak / GiB:8.2f}",
        f"    + reserve (CUDA context, NCCL,  {reserve_gib:8.2f}   (assumed, --reserve)",
        "      allocator fragmentation)",
        *([COMPILE_NOTE] if r.compile_traced_eager else []),
        f"dry run: peak {total:.1f} GiB per rank of {gpu_mem_gib:g} GiB: {'fits' if fits else 'does not fit'}",
    ]
    return lines, fits
