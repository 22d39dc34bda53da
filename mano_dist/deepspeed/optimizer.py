"""Mano on DeepSpeed ZeRO's flat fp32 partitions.

Same update as :class:`mano_dist.Mano` (same ``functional.py`` generators, same lockstep
driver); only ``_matrices`` differs: it cuts each flat partition into per-matrix fragment views
(``zero_metadata.py``) with a :class:`FlatFragmentLayout`, so every matrix's per-row/column
statistics are completed by one all-reduce over the data-parallel group per ``step()`` call.
Momentum and AdamW moments are one flat buffer per partition: they never exist at full size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from . import fused_cpu
from ..layouts import ReduceGroup, matrix_shape
from ..optimizer import Mano
from .fragments import split_fragment
from .zero_metadata import FlatPartition, flat_partitions, zero_stage_of


class DeepSpeedMano(Mano):
    """:class:`mano_dist.Mano` for ``deepspeed.initialize`` (ZeRO stages 0-3).

    Built by DeepSpeed from ``"optimizer": {"type": "Mano"}`` after ``import mano_dist.deepspeed``,
    or passed as ``optimizer=`` with :func:`mano_dist.mano_param_groups` groups. The engine calls
    :meth:`attach` once ZeRO has replaced the params by flat partitions; state is created there
    (eagerly, on the partitions), never for the full-size params.
    """

    _rebinds_swapped_params = False  # ZeRO swaps flat partitions in and out of param_groups itself

    def __init__(self, *args, fused_cpu: bool = True, **kwargs):
        self.fused_cpu = bool(fused_cpu)  # ZeRO-Offload: fused, compiled CPU passes (fused_cpu.py)
        self._fused = False
        self._attached = False
        self._engine_building = False  # set by the engine hook while DeepSpeed wraps us
        self._engine_optimizer = None  # the ZeRO wrapper that calls us (it holds the global grad norm)
        self._partitions: dict[int, FlatPartition] = {}
        self._layouts: dict[int, list] = {}
        self.zero_stage = 0
        super().__init__(*args, **kwargs)

    def _init_state(self, p, algorithm):
        if self._attached:
            super()._init_state(p, algorithm)

    # ---------------------------------------------------------------- binding to the engine
    def attach(self, engine) -> None:
        """Read the ZeRO layout of ``engine.optimizer`` and create state on what this rank holds."""
        zopt = engine.optimizer
        self.zero_stage = engine.zero_optimization_stage() if zopt is not self else 0
        self._engine_optimizer = zopt if zopt is not self else None
        if self.zero_stage >= 1:
            zero_stage_of(zopt)  # unknown wrapper types fail here, with the supported list
            self.process_group = zopt.dp_process_group
            size = dist.get_world_size(self.process_group)
            groups = (ReduceGroup.of(self.process_group),) if size > 1 else ()
            self._partitions = {id(part.flat): part for part in flat_partitions(zopt)}
            self._layouts = {  # per fragment: (offset, numel, layout) of each matrix in it
                key: [
                    split_fragment(matrix_shape(f.shape), f.param_start, f.numel,
                                   self.param_groups[part.group_index].get("splits"), groups)
                    for f in part.fragments
                ]
                for key, part in self._partitions.items()
            }
            flats = [(part.flat, self.param_groups[part.group_index]["algorithm"])
                     for part in self._partitions.values()]
        else:
            flats = [(p, g["algorithm"]) for g in self.param_groups for p in g["params"]]
        self._fused = self.fused_cpu and self.zero_stage >= 1 and bool(engine.zero_cpu_offload())
        self.state.clear()
        self._attached = True
        for p, algorithm in flats:
            self._init_state(p, algorithm)

    # ---------------------------------------------------------------- Mano hooks
    def _matrices(self, group, params):
        if self.zero_stage == 0:
            return super()._matrices(group, params)
        out = []
        for flat in params:
            part = self._partitions.get(id(flat))
            if part is None:
                raise ValueError(
                    "DeepSpeedMano got a flat tensor it has no ZeRO layout for; it must be built "
                    "by deepspeed.initialize after `import mano_dist.deepspeed` (which calls attach)"
                )
            momentum = self.state[flat]["momentum_buffer"]
            for f, pieces in zip(part.fragments, self._layouts[id(flat)]):
                for offset, numel, lay in pieces:
                    cut = slice(f.flat_start + offset, f.flat_start + offset + numel)
                    out.append((flat[cut], flat.grad[cut], momentum[cut], lay))
        return out

    def _momentum_directions(self, grads, bufs, momentum, nesterov, skip):
        if self._fused and all(g.dtype == torch.float32 for g in grads):
            return fused_cpu.momentum_directions(grads, bufs, momentum, nesterov, skip)
        return super()._momentum_directions(grads, bufs, momentum, nesterov, skip)

    def _matrix_step(self, weight, direction, layout, **hyper):
        if self.zero_stage == 0:
            return super()._matrix_step(weight, direction, layout, **hyper)
        if self._fused and fused_cpu.supports(hyper["variant"], weight.dtype):
            return fused_cpu.fragment_step(layout, weight, direction, **hyper)
        return layout.matrix_step(weight, direction, **hyper)

    def _fusable(self, group) -> bool:
        return self.zero_stage == 0  # ZeRO fragments: the eager blocks (or the offload passes)

    def _shares_params_across_ranks(self) -> bool:
        return self.zero_stage >= 1 and dist.get_world_size(self.process_group) > 1

    def _state_device(self) -> torch.device:
        for part in self._partitions.values():
            return part.flat.device
        return super()._state_device()

    def _found_nonfinite(self, found=(), grads=None):
        """Under ZeRO the engine has usually computed this step's global gradient norm (for
        clipping) over every group, all-reduced, before it hands us the first one: a non-finite
        (or DeepSpeed's invalid marker, negative) norm is the skip decision, with no collective
        of ours, and alike for every group of the step (stages 1/2 step one group per call,
        each group's gradients built just before its call, so no call sees them all)."""
        norm = getattr(self._engine_optimizer, "_global_grad_norm", None) if self.zero_stage >= 1 else None
        if torch.is_tensor(norm):
            return (~torch.isfinite(norm) | (norm < 0)).reshape(()).to(self._state_device())
        return super()._found_nonfinite(found, grads)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One DeepSpeed call: the param group (stages 1/2) or sub-group (stage 3) it swapped in.

        Stage 3 leaves every group in ``param_groups`` and empties all but one, and calls once
        per sub-group: only groups with params are stepped, and a group's rotation counter
        advances after its last sub-group, i.e. once per optimizer step.
        """
        if not self._attached:
            if self._engine_building:
                # DeepSpeed's bf16 stage-0 wrapper calls step() with zero grads to create state;
                # that step must not decay weights or turn the rotation: state comes in attach().
                return None
            raise RuntimeError(
                "DeepSpeedMano was not attached to a DeepSpeed engine: build it through "
                "deepspeed.initialize after `import mano_dist.deepspeed`, or mano_dist.deepspeed.initialize"
            )
        if self.zero_stage == 0:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [g for g in self.param_groups if g["params"]]
        self._step_groups(groups)
        for group in groups:
            if all(self._partitions[id(p)].last_of_group for p in group["params"]):
                group["step"] += 1
        return loss
