"""Where each parameter's elements sit in DeepSpeed ZeRO's flat fp32 partitions.

This is the only module that reads DeepSpeed's private ZeRO attributes; they are those of
deepspeed==0.19.8 (pinned in pyproject.toml) and ``tests/test_deepspeed.py`` checks that the
fragments read here tile every partition and every parameter exactly.

- Stages 1/2 (``DeepSpeedZeroOptimizer``): param group ``i`` is flattened (with alignment
  padding) and cut into equal partitions; this rank's fp32 piece is
  ``single_partition_of_fp32_groups[i]``. For ``p`` in ``bit16_groups[i]``, ``p._hp_mapping``
  (None when this rank holds nothing of p) gives ``lp_fragment_address.start`` (offset in p's
  row-major storage) and ``hp_fragment_address.start/numel`` (offset and length in the piece).
- ZeRO-1 with bf16 params and fp32 gradient accumulation (``BF16_Optimizer``): the same with
  ``bf16_groups`` and ``fp32_groups_flat_partition``; it calls ``step()`` once for all groups.
- Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): every param is split on its own, rank r owning
  elements ``[r * p.partition_numel(), ...)`` (the last rank's tail is padding), packed in order
  into ``fp32_partitioned_groups_flat[s]`` for sub-group ``s`` of param group
  ``sub_group_to_group_id[s]``; the true shape is ``p.ds_shape``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Fragment:
    """Elements ``[param_start, param_start + numel)`` of one param, at ``flat_start`` in a flat
    partition. ``numel`` is 0 when this rank holds none of the param."""

    param_index: int  # position of the param in its (sub-)group
    shape: tuple[int, ...]  # the param's true shape
    param_start: int
    flat_start: int
    numel: int


@dataclass
class FlatPartition:
    """One flat fp32 tensor the optimizer steps on, and what is in it."""

    flat: Tensor
    group_index: int  # index in optimizer.param_groups
    fragments: list[Fragment]
    last_of_group: bool  # stage 3: the group's last sub-group (the rotation advances after it)


def zero_stage_of(zero_optimizer) -> int:
    name = type(zero_optimizer).__name__
    if name == "DeepSpeedZeroOptimizer":
        return 2 if zero_optimizer.partition_gradients else 1
    if name == "DeepSpeedZeroOptimizer_Stage3":
        return 3
    if name == "BF16_Optimizer":  # ZeRO-1 with bf16 params and fp32 gradient accumulation
        return 1
    raise TypeError(
        f"mano_dist.deepspeed does not know DeepSpeed's {name}; supported: ZeRO stages 0-3 "
        "(DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3) of deepspeed==0.19.8"
    )


def flat_partitions(zero_optimizer) -> list[FlatPartition]:
    """Every flat partition of this rank and the fragment of every param in it."""
    if zero_stage_of(zero_optimizer) == 3:
        return _stage3_partitions(zero_optimizer)
    return _stage12_partitions(zero_optimizer)


def _stage12_partitions(zopt) -> list[FlatPartition]:
    out = []
    bf16_wrapper = type(zopt).__name__ == "BF16_Optimizer"
    lp_groups = zopt.bf16_groups if bf16_wrapper else zopt.bit16_groups
    for i, params in enumerate(lp_groups):
        flat = zopt.fp32_groups_flat_partition[i] if bf16_wrapper else zopt.single_partition_of_fp32_groups[i]
        fragments = []
        for j, p in enumerate(params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                fragments.append(Fragment(j, tuple(p.shape), 0, 0, 0))
            else:
                fragments.append(Fragment(
                    j, tuple(p.shape), int(mapping.lp_fragment_address.start),
                    int(mapping.hp_fragment_address.start), int(mapping.hp_fragment_address.numel),
                ))
        out.append(FlatPartition(flat, i, fragments, True))
    return out


def _stage3_partitions(zopt) -> list[FlatPartition]:
    out = []
    group_of = zopt.sub_group_to_group_id
    num_sub = len(zopt.fp16_groups)
    for s, params in enumerate(zopt.fp16_groups):
        flat = zopt.fp32_partitioned_groups_flat[s]
        fragments, offset = [], 0
        for j, p in enumerate(params):
            per_rank = int(p.partition_numel())
            start = dist.get_rank(p.ds_process_group) * per_rank
            real = min(per_rank, max(0, int(p.ds_numel) - start))
            fragments.append(Fragment(j, tuple(p.ds_shape), start if real else 0, offset, real))
            offset += per_rank
        last = s + 1 == num_sub or group_of[s + 1] != group_of[s]
        out.append(FlatPartition(flat, group_of[s], fragments, last))
    return out
