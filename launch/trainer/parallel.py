"""Process group, device mesh and model parallelism for the trainer: the distributed concerns in
one place.

- ``setup_distributed``: CUDA + NCCL when GPUs are visible, else CPU + gloo; under torchrun's
  elastic agent the store is namespaced per restart attempt.
- ``build_mesh``: a ``(dp,)`` or ``(dp, tp)`` device mesh.
- ``parallelize``: the one function that turns a built model into the one that runs, in
  torchtitan's order: tensor parallel inside each block (colwise wq, wk, wv, w1, w3; rowwise wo,
  w2), activation checkpointing per block, ``torch.compile`` per block, then FSDP2 over ``dp``
  (each block, the embedding, final norm + head, the root) with the bf16 ``MixedPrecisionPolicy``
  when asked. The trainer and the dry run both call it, so what is estimated is what runs.
- ``clip_grad_norm``: the global gradient norm over parameters that live on different meshes
  (2-D TP+FSDP blocks, 1-D FSDP embedding), which ``torch.nn.utils.clip_grad_norm_`` cannot mix.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

TP_PLAN_COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
TP_PLAN_ROWWISE = ("attention.wo", "feed_forward.w2")


def setup_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). ``timeout_s`` (``parallel.timeout_s``) bounds every collective:
    a rank that never joins one makes its peers fail after that long instead of torch's default
    (30 min for gloo, 10 for NCCL); None keeps torch's default."""
    if "RANK" not in os.environ:  # plain `python -m launch.train`: one process, no group
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, store=_attempt_store(), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), **timeout)
    return dist.get_rank(), dist.get_world_size(), device


def _attempt_store() -> dist.Store | None:
    """torchrun's c10d rendezvous shares the agent's TCPStore with the workers across elastic
    restarts, and the process group's keys carry no restart count: a restarted worker can read
    the address a dead worker published and fail to connect. Prefixing the store with the
    restart count gives each attempt a clean namespace."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False)
    return dist.PrefixStore(f"mano_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def build_mesh(device: torch.device, world: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    if tp == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model, mesh, cfg, *, shard: bool = True):
    """TP, then activation checkpointing, then compile, then FSDP2, from the run config.

    ``mesh`` None (one process) or ``shard=False`` (DeepSpeed shards the model itself) skips
    TP and FSDP2. Checkpointing and compile wrap each block in place of the block; the
    wrappers' name prefixes (``_checkpoint_wrapped_module``, ``_orig_mod``) are dropped by DCP's
    state dicts, so checkpoints do not depend on these switches. Returns the model.
    """
    t = cfg.train
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    if shard and "tp" in names:
        apply_tensor_parallel(model, mesh["tp"])
    if t.activation_checkpoint == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if t.compile:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)
    if shard and mesh is not None:
        apply_fsdp(model, mesh["dp"] if "tp" in names else mesh, t.mixed_precision)
    return model


def apply_tensor_parallel(model, tp_mesh) -> None:
    """torchtitan's LLaMA plan inside each block (the embedding and head stay replicated over tp)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {n: ColwiseParallel() for n in TP_PLAN_COLWISE} | {n: RowwiseParallel() for n in TP_PLAN_ROWWISE}
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)


def apply_fsdp(model, dp_mesh, mixed_precision: str = "none") -> None:
    """``fully_shard`` per block, the embedding, [final norm, head], then the root. bf16:
    parameters all-gathered and computed in bf16, gradients reduced in fp32, and the sharded
    fp32 parameters stay the master weights the optimizer updates."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model.tok_embeddings, mesh=dp_mesh, mp_policy=policy)
    fully_shard([model.norm, model.output], mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def shard_model(model, mesh) -> None:
    """Tensor parallel per block (when the mesh has a ``tp`` dim), then FSDP2 over ``dp``, fp32
    (the planner's and tests' shorthand for ``parallelize`` with the default switches)."""
    names = mesh.mesh_dim_names or ()
    if "tp" in names:
        apply_tensor_parallel(model, mesh["tp"])
    apply_fsdp(model, mesh["dp"] if "tp" in names else mesh)


def data_parallel_rank(mesh) -> tuple[int, int]:
    """(rank, size) along ``dp``: tensor-parallel peers read the same batch."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"] if "tp" in (mesh.mesh_dim_names or ()) else mesh
    return dp.get_local_rank(), dp.size()


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm as a
    0-d float64 tensor on the gradients' device. ``max_norm`` 0 means no clipping (DeepSpeed's
    ``gradient_clipping = 0`` convention, so ``optim.grad_clip = 0`` means the same under both
    engines): the norm is still computed for the log and the gradients are left untouched.
    A negative or non-finite ``max_norm`` is refused (it would scale by a negative number or NaN).

    Groups gradients by device mesh and takes each group's norm with torch's own
    ``get_total_norm`` (a DTensor norm reduces over its mesh exactly once per element). The
    groups' norms are combined and the coefficient min(1, max_norm / (norm + 1e-6)) applied on
    the device, as ``torch.nn.utils.clip_grads_with_norm_`` does, so nothing here makes the host
    wait for the GPU (the trainer reads the norm when it logs). The combination is float64 in
    the order the host used to add it, and a NaN norm scales nothing, as the host's
    ``if coef < 1`` did: the gradients are the same bits as with the host-side formula.
    """
    if not (max_norm >= 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be >= 0 and finite (0: no clipping), got {max_norm!r}")
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    total_sq = None
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        square = norm.double().square()
        total_sq = square if total_sq is None else total_sq + square
    if total_sq is None:
        return torch.zeros((), dtype=torch.float64)
    total = total_sq.sqrt()
    if max_norm == 0:
        return total
    coef = max_norm / (total + 1e-6)
    coef = torch.where(coef < 1.0, coef, torch.ones_like(coef))
    for grads in groups.values():
        for dtype in {g.dtype for g in grads}:
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
    return total


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t
