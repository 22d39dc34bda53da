"""Plan a run before renting the GPUs: exact parameter counts, per-GPU memory and optimizer traffic.

    python -m launch.plan --config configs/llama_1b.toml --nodes 4 --gpus-per-node 8 [--tp 2] \
        [--gpu-mem 80] [--dry-run]

Builds the model on the meta device (no memory, any size), splits its parameters the way the
trainer does (hidden matrices to Mano/Muon, embeddings, head and 1-D params to AdamW) and prints:

- parameter counts per role, exact;
- per-GPU memory for params, grads and optimizer state under FSDP2 and ZeRO-1/2/3, for AdamW,
  Mano and Muon (bytes per element below);
- activations per micro-batch (bf16, without and with checkpointing), the predicted FSDP2 +
  Mano peak of the config, and the largest micro-batch that fits ``--gpu-mem``;
- optimizer communication per step and rank, from the same per-slice rule the optimizer follows
  (``mano_dist.layouts``): for axis k, 3 statistics per slice are all-reduced over the mesh
  groups that shard axis k, nothing when axis k is local;
- with ``--dry-run``, the trainer's real step traced on fake tensors at this world size
  (``launch/trainer/dryrun.py``), ending with ``dry run: peak X.X GiB per rank of Y GiB: fits`` (exit 0)
  or ``...: does not fit`` (exit 3).

Memory model (the usual accounting, bf16 compute):
  FSDP2    fp32 params, fp32 grads, optimizer state: all sharded over dp x tp.
  ZeRO-1   bf16 params + bf16 grads replicated; fp32 master + optimizer state partitioned.
  ZeRO-2   bf16 params replicated; bf16 grads, fp32 master, optimizer state partitioned.
  ZeRO-3   everything partitioned.
  State    AdamW 8 B/element (exp_avg, exp_avg_sq); Mano and Muon 4 B per matrix element
           (one momentum buffer) and AdamW's 8 B for the rest. Under DeepSpeed ZeRO 1-3 (and
           ZeRO-Offload) this is measured: Mano holds 4.00 B per partition element, AdamW 8.00,
           and Mano's step adds no partition-sized temporary
           (``python -m mano_dist.bench memory --engine deepspeed``, docs/deepspeed.md).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from mano_dist.layouts import matrix_shape
from mano_dist.param_groups import classify_parameters

from ..config import ConfigError, load_config
from .model import Llama
from .parallel import TP_PLAN_COLWISE, TP_PLAN_ROWWISE

GiB = 2**30
MiB = 2**20
PLAN_HEADROOM = 0.10  # the suggested micro-batch leaves this fraction of the GPU free


@dataclass(frozen=True)
class ParamCounts:
    matrices: list[tuple[str, tuple[int, int]]]  # (name, (rows, cols)) of every Mano matrix
    embeddings: int
    head: int
    other: int  # norms, biases: 1-D, on AdamW

    @property
    def matrix_elements(self) -> int:
        return sum(m * n for _, (m, n) in self.matrices)

    @property
    def fallback(self) -> int:
        return self.embeddings + self.head + self.other

    @property
    def total(self) -> int:
        return self.matrix_elements + self.fallback


def count_parameters_by_role(model: torch.nn.Module) -> ParamCounts:
    mano, adamw = classify_parameters(model)
    embeddings = sum(p.numel() for n, p in adamw if "embed" in n)
    head = sum(p.numel() for n, p in adamw if n.startswith("output."))
    other = sum(p.numel() for _, p in adamw) - embeddings - head
    return ParamCounts([(n, matrix_shape(p.shape)) for n, p in mano], embeddings, head, other)


def memory_per_gpu(counts: ParamCounts, strategy: str, dp: int, tp: int = 1) -> dict[str, float]:
    """Bytes per GPU: params, grads, and optimizer state for each optimizer."""
    P, M, F = counts.total, counts.matrix_elements, counts.fallback
    shards = dp * tp
    if strategy == "fsdp2":
        params, grads = 4 * P / shards, 4 * P / shards
    elif strategy == "zero1":
        params, grads = 2 * P / tp + 4 * P / shards, 2 * P / tp
    elif strategy == "zero2":
        params, grads = 2 * P / tp + 4 * P / shards, 2 * P / shards
    elif strategy == "zero3":
        params, grads = 6 * P / shards, 2 * P / shards
    else:
        raise ValueError(f"strategy: unknown {strategy!r}")
    return {"params": params, "grads": grads, "adamw": 8 * P / shards,
            "mano": (4 * M + 8 * F) / shards, "muon": (4 * M + 8 * F) / shards}


def saved_bytes_per_token_per_block(m, tp: int = 1, compute_bytes: int = 2) -> float:
    """Bytes one block keeps for backward per token, read off the block's ops (``launch/trainer/model.py``).

    ``compute_bytes`` 2 under bf16 (FSDP2 param_dtype), 4 in fp32. TP splits the attention and
    FFN tensors over ``tp`` (no sequence parallelism: the norms see the whole width).
    - each RMSNorm: its fp32 input copy, the normalised tensor, its output (4 + 2c) d;
    - attention: q and k before and after RoPE, v, the attention output and its reshaped copy
      (7 c d / tp), and the fp32 log-sum-exp a flash kernel keeps per head (4 h / tp);
    - SwiGLU: w1's and w3's outputs, silu's output and the product (4 c ffn / tp).
    """
    c, d, f, h = compute_bytes, m.dim, m.ffn_dim, m.n_heads
    return 2 * (4 * d + 2 * c * d) + (7 * c * d + 4 * c * f + 4 * h) / tp + 8


def activation_bytes(m, seq: int, micro: int, tp: int = 1, compute_bytes: int = 2, checkpoint: str = "none") -> float:
    """Bytes every block keeps for backward over one micro-batch: all its saved tensors, or with
    full checkpointing only its input (the block is recomputed in backward)."""
    tokens = seq * micro
    if checkpoint == "full":
        return m.n_layers * compute_bytes * m.dim * tokens
    return m.n_layers * saved_bytes_per_token_per_block(m, tp, compute_bytes) * tokens


def _block_elements(m) -> int:
    return 4 * m.dim * m.dim + 3 * m.dim * m.ffn_dim + 2 * m.dim


def predict_peak(cfg, dp: int, tp: int, micro: int) -> float:
    """Peak bytes per GPU of an FSDP2 Mano step: the sharded fp32 params, grads and state, the
    blocks' saved activations of one micro-batch, and the larger of two moments of its backward:

    - the head's: the logits (compute dtype, kept by the training loop), their fp32
      log-softmax and its gradient; the unsharded head and the prefetched last block, the
      head's gradient in compute dtype and its fp32 copy for the reduce-scatter;
    - a block's: the logits, the block recomputed when checkpointing, two unsharded blocks (the
      running one and the prefetched one) and one block's gradient in compute dtype + fp32.
    """
    with torch.device("meta"):
        counts = count_parameters_by_role(Llama(cfg.model))
    m, t = cfg.model, cfg.train
    c = 2 if t.mixed_precision == "bf16" else 4
    mem = memory_per_gpu(counts, "fsdp2", dp, tp)
    static = mem["params"] + mem["grads"] + mem["mano"]
    tokens = cfg.data.seq_len * micro
    head, block = m.vocab_size * m.dim, _block_elements(m) / tp
    logits = c * m.vocab_size * tokens
    at_head = logits + 8 * m.vocab_size * tokens + c * (head + block) + (c + 4) * head
    recompute = saved_bytes_per_token_per_block(m, tp, c) * tokens if t.activation_checkpoint == "full" else 0
    at_block = logits + recompute + 2 * c * block + (c + 4) * block
    saved = activation_bytes(m, cfg.data.seq_len, micro, tp, c, t.activation_checkpoint)
    return static + saved + max(at_head, at_block)


def _sharding(name: str, strategy: str, dp: int, tp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Group sizes that shard (rows, columns) of one matrix."""
    module = name.removesuffix(".weight")  # the trainer's TP plan names modules inside a block
    rows, cols = [], []
    if tp > 1 and module.endswith(TP_PLAN_COLWISE):
        rows.append(tp)
    if tp > 1 and module.endswith(TP_PLAN_ROWWISE):
        cols.append(tp)
    if dp > 1:
        rows.append(dp)  # FSDP2 Shard(0); a ZeRO flat partition also cuts rows (and columns, below)
    return tuple(rows), tuple(cols)


def _all_reduce_wire(payload: float, group: int) -> float:
    """Bytes one rank sends in a bandwidth-optimal (ring) all-reduce."""
    return 2 * (group - 1) / group * payload


def _gather_wire(full: float, group: int) -> float:
    return (group - 1) / group * full


def optimizer_traffic(counts: ParamCounts, dp: int, tp: int = 1) -> dict[str, float]:
    """Optimizer bytes sent per rank per optimizer step (averaged over the two rotation phases)."""
    mano_fsdp = 0.0
    for name, (m, n) in counts.matrices:
        rows, cols = _sharding(name, "fsdp2", dp, tp)
        n_local, m_local = n // math.prod(cols), m // math.prod(rows)
        # axis 0: one statistic per (local) column, reduced over the groups that shard rows;
        # axis 1: per (local) row, over the groups that shard columns. Half the steps each.
        # float64 statistics (8 bytes each, functional.STATS_DTYPE)
        mano_fsdp += sum(_all_reduce_wire(3 * n_local * 8, g) for g in rows) / 2
        mano_fsdp += sum(_all_reduce_wire(3 * m_local * 8, g) for g in cols) / 2
    # ZeRO: a flat partition can cut any row or column, so every matrix's full statistics
    # vector rides the all-reduce on every step (per slice of the step's axis).
    slices = sum((m + n) / 2 for _, (m, n) in counts.matrices)
    mano_zero = _all_reduce_wire(3 * slices * 8, dp) if dp > 1 else 0.0
    full = counts.matrix_elements * 4  # fp32 bytes of every matrix
    shards = dp * tp
    return {
        "adamw": 0.0,
        "mano_fsdp2": mano_fsdp,
        "mano_zero": mano_zero,
        "muon_fsdp2_gather": _gather_wire(full, shards),  # at least one gather of each update
        "dion_all_to_all": 2 * (shards - 1) / shards * (counts.matrix_elements / shards) * 2,  # bf16
        "deepspeed_muon_zero3": 2 * _gather_wire(full, dp),  # gathers grad and momentum
    }


def _fmt_gib(b: float) -> str:
    return f"{b / GiB:9.2f}"


def _fmt_mib(b: float) -> str:
    return f"{b / MiB:12.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    ap.add_argument("--dry-run", action="store_true",
                    help="also trace one real step on fake tensors at this world size (launch/trainer/dryrun.py); "
                         "exit 3 when it does not fit")
    ap.add_argument("--reserve", type=float, default=None, metavar="GIB",
                    help="added to the dry run's traced peak for the CUDA context, NCCL and fragmentation (default 3)")
    args = ap.parse_args(argv)
    world = args.nodes * args.gpus_per_node

    def check_world(tp: int) -> None:
        if world < 1 or tp < 1 or world % tp:
            ap.error(f"{world} GPUs cannot be split into tensor-parallel groups of {tp}")

    if args.tp is not None:
        check_world(args.tp)
    tp_override = [] if args.tp is None else [f"parallel.tp={args.tp}"]  # so the config's own checks see it
    try:
        cfg = load_config(args.config, args.overrides + tp_override)
    except ConfigError as e:
        ap.error(str(e))
    tp = cfg.parallel.tp
    check_world(tp)
    dp = world // tp
    with torch.device("meta"):
        model = Llama(cfg.model)
    c = count_parameters_by_role(model)

    print(f"{args.config}: {c.total:,} parameters ({c.total / 1e9:.3f} B)")
    print(f"  hidden matrices (Mano) {c.matrix_elements:>15,}  ({len(c.matrices)} matrices)")
    print(f"  token embeddings       {c.embeddings:>15,}  (AdamW)")
    print(f"  output head            {c.head:>15,}  (AdamW)")
    print(f"  norms and biases       {c.other:>15,}  (AdamW)")
    print(f"\n{args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} ranks: data parallel {dp}, tensor parallel {tp}")
    print("\nper-GPU memory, GiB (params + grads + optimizer state; activations not included)")
    print(f"{'strategy':<8}{'params':>9}{'grads':>9}{'AdamW st':>9}{'Mano st':>9}{'Muon st':>9}"
          f"{'= AdamW':>9}{'= Mano':>9}{'= Muon':>9}")
    for strategy in ("fsdp2", "zero1", "zero2", "zero3"):
        mem = memory_per_gpu(c, strategy, dp, tp)
        base = mem["params"] + mem["grads"]
        print(f"{strategy:<8}{_fmt_gib(mem['params'])}{_fmt_gib(mem['grads'])}{_fmt_gib(mem['adamw'])}"
              f"{_fmt_gib(mem['mano'])}{_fmt_gib(mem['muon'])}{_fmt_gib(base + mem['adamw'])}"
              f"{_fmt_gib(base + mem['mano'])}{_fmt_gib(base + mem['muon'])}")
    largest = max(m * n for _, (m, n) in c.matrices) * 4
    print(f"Muon also needs each full matrix on the rank that orthogonalises it: {largest / MiB:,.0f} MiB "
          f"(largest, fp32) plus Newton-Schulz workspace; Mano's transients are local-shard sized.")

    _print_activations(cfg, dp, tp, args.gpu_mem)

    t = optimizer_traffic(c, dp, tp)
    print("\noptimizer communication per step and rank (ring algorithms; MiB sent)")
    rows = [("AdamW", "none", t["adamw"]),
            ("Mano, FSDP2/TP", "all-reduce of per-slice statistics", t["mano_fsdp2"]),
            ("Mano, ZeRO 1-3", "one all-reduce of per-slice statistics", t["mano_zero"]),
            ("Muon, FSDP2", "all-gather of every matrix (>= 1x)", t["muon_fsdp2_gather"]),
            ("Dion-style Muon", "2 all-to-alls of every matrix, bf16", t["dion_all_to_all"]),
            ("DeepSpeed Muon, ZeRO-3", "all-gather of grad and momentum", t["deepspeed_muon_zero3"])]
    for name, how, b in rows:
        print(f"  {name:<24}{_fmt_mib(b)}   {how}")
    print("  (DeepSpeed Muon on ZeRO-1/2 sends nothing extra but runs Newton-Schulz on every full "
          "matrix on every rank.)")
    if not args.dry_run:
        return 0
    return _dry_run(cfg, world, args.gpu_mem, args.reserve)


def _print_activations(cfg, dp: int, tp: int, gpu_mem_gib: float) -> None:
    """Activations per micro-batch (bf16, without and with checkpointing) and the predicted FSDP2
    peak of the config's own precision and checkpointing, with the largest micro-batch that fits."""
    m, t, seq = cfg.model, cfg.train, cfg.data.seq_len
    from .dryrun import DEFAULT_RESERVE_GIB

    per_rank = t.global_batch // dp if t.global_batch % dp == 0 else None
    print(f"\nactivations the blocks keep per micro-batch of {seq}-token sequences, GiB per GPU (bf16 compute)")
    print(f"{'micro-batch':>11}{'none':>9}{'full ckpt':>10}   predicted FSDP2 + Mano peak, this config "
          f"({t.mixed_precision} precision, {t.activation_checkpoint} checkpointing)")
    best = None
    for micro in (1, 2, 4, 8, 16, 32, 64):
        if per_rank is not None and (micro > per_rank or per_rank % micro):
            continue
        peak = predict_peak(cfg, dp, tp, micro)
        if peak / GiB + DEFAULT_RESERVE_GIB <= gpu_mem_gib * (1 - PLAN_HEADROOM):
            best = micro
        print(f"{micro:>11}{_fmt_gib(activation_bytes(m, seq, micro, tp, 2))}"
              f"{_fmt_gib(activation_bytes(m, seq, micro, tp, 2, 'full'))} {_fmt_gib(peak)}")
    if best is None:
        print(f"no micro-batch fits {gpu_mem_gib:g} GiB with {PLAN_HEADROOM:.0%} headroom at this precision and checkpointing")
    else:
        acc = f" x {per_rank // best} accumulation" if per_rank else ""
        print(f"largest micro-batch whose peak + {DEFAULT_RESERVE_GIB:g} GiB reserve fits {gpu_mem_gib:g} GiB with "
              f"{PLAN_HEADROOM:.0%} headroom: "
              f"train.micro_batch = {best}{acc} (config has {t.micro_batch or 'the whole per-rank batch'})")


def _dry_run(cfg, world: int, gpu_mem_gib: float, reserve_gib: float | None) -> int:
    from .dryrun import DEFAULT_RESERVE_GIB, dry_run, report

    try:
        result = dry_run(cfg, world)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    lines, fits = report(result, gpu_mem_gib, DEFAULT_RESERVE_GIB if reserve_gib is None else reserve_gib)
    print()
    print("\n".join(lines))
    return 0 if fits else 3


if __name__ == "__main__":
    raise SystemExit(main())
