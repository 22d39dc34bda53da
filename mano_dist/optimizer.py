"""The Mano optimizer: param groups, eager state, the rotation counter, the AdamW fallback and
the non-finite policy. The math lives in ``functional.py``; where elements live, in ``layouts.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import fused as fused_step
from .adamw_fallback import adamw_group_step, adamw_hyper, adamw_state, adamw_tensors, momentum_state
from .dtensors import is_dtensor, local
from .functional import VARIANTS, any_nonfinite, mano_matrix_step, momentum_directions, nonfinite_flags, skip_gate
from .fused_driver import first_statistics, make_batches, run_batches, unchecked_gradients
from .layouts import check_splits, layout_for, split_rows
from .lockstep import all_reduce_on_device, default_all_reduce, holds_no_values, run_lockstep

ALGORITHMS = ("mano", "adamw")
NONFINITE_POLICIES = ("skip", "raise", "ignore")


def _check_group(group: dict[str, Any]) -> None:
    """torch.optim-style validation: a ValueError naming the argument."""
    checks = [
        ("lr", group["lr"], 0.0 <= group["lr"]),
        ("momentum", group["momentum"], 0.0 <= group["momentum"] < 1.0),
        ("weight_decay", group["weight_decay"], 0.0 <= group["weight_decay"]),
        ("eps", group["eps"], 0.0 < group["eps"]),
        ("adamw_eps", group["adamw_eps"], 0.0 < group["adamw_eps"]),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"Invalid {name}: {value}")
    betas = tuple(group["adamw_betas"])
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid adamw_betas: {group['adamw_betas']} (two values in [0, 1))")
    if group["variant"] not in VARIANTS:
        raise ValueError(f"Invalid variant: {group['variant']!r} (one of {', '.join(VARIANTS)})")
    if group["algorithm"] not in ALGORITHMS:
        raise ValueError(f"Invalid algorithm: {group['algorithm']!r} (one of {', '.join(ALGORITHMS)})")


def reduced_axis(group: dict[str, Any]) -> int:
    """The axis a Mano group's next step normalises along: it alternates with the group's steps
    (k = 0 columns, k = 1 rows), counted on the host."""
    return int(group["step"]) % 2


class Mano(Optimizer):
    """Mano: momentum projected on the tangent space of the oblique manifold, normalised per
    column or per row (alternating every optimizer step), for hidden weight matrices; AdamW for
    everything else (param groups with ``"algorithm": "adamw"``, see :func:`mano_param_groups`).

    Works unchanged on plain tensors and on DTensors (FSDP2, HSDP, tensor parallel): it computes
    on local shards and all-reduces only per-row/column statistics, and only over the mesh dims
    that shard the reduced axis.

    Args:
        params: tensors or param groups; a group may set ``algorithm`` and override any option.
        lr, weight_decay: learning rate and decoupled weight decay (both algorithms).
        momentum, nesterov: heavy-ball momentum M <- mu M + g; direction g + mu M if nesterov.
        eps: guards the slice norms.
        variant: ``"v1"`` (paper), ``"v2"`` (authors' later rule, default) or ``"both"`` (both
            axes every step).
        adamw_betas, adamw_eps: the AdamW fallback.
        nonfinite: ``"skip"`` (default: a step with any non-finite gradient changes no weight, no
            momentum and no AdamW moment, and is counted in ``skipped_steps``; decided on the
            device, so the step reads nothing on the host), ``"raise"`` (``FloatingPointError``
            naming the parameter; this reads one flag on the host per step) or ``"ignore"``
            (no check). On sharded params the decision is taken collectively (one 4-byte
            all-reduce), so every rank skips or raises together.
        process_group: group over which that decision is shared (default: the world).
        fused: step with a few compiled kernels per group of like matrices (``torch.compile``,
            inductor: C++ on CPU, Triton on CUDA) instead of ~30 eager ops per matrix; the same
            math and collectives. ``None`` (default): on for params on an accelerator (where
            eager steps are launch-bound), off on CPU (where they are not, and compiling costs
            seconds per matrix shape at the first step). If compiling fails, one warning and
            the eager step. DeepSpeed ZeRO fragments always take the eager/offload path.
        mano_params, adamw_params, wd: the official Mano code's keywords, so its users switch
            by changing an import.

    The rotation axis is k = t mod 2 where t counts ``step()`` calls; it is kept per param group
    as ``group["step"]`` (a number, so it survives ``state_dict`` and DCP), and every group
    advances once per ``step()`` call on it, also when none of its params has a gradient and
    when the step is skipped (the axis is chosen on the host, before the device says whether
    to skip). AdamW's step counts are tensors on the params' device and do not count skips.
    """

    def __init__(
        self,
        params: Iterable | None = None,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        variant: str = "v2",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        nonfinite: str = "skip",
        process_group=None,
        fused: bool | None = None,
        mano_params: Iterable[Tensor] | None = None,
        adamw_params: Iterable[Tensor] | None = None,
        wd: float | None = None,
    ):
        if wd is not None:
            weight_decay = wd
        if mano_params is not None or adamw_params is not None:
            if params is not None:
                raise ValueError("Pass either params or mano_params/adamw_params, not both")
            params = [{"params": list(mano_params or []), "algorithm": "mano"}]
            if adamw_params is not None:
                params.append({"params": list(adamw_params), "algorithm": "adamw"})
        if params is None:
            raise ValueError("Mano needs params (or mano_params=/adamw_params=)")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {', '.join(NONFINITE_POLICIES)})")
        self.nonfinite = nonfinite
        self.process_group = process_group
        self._skipped: Tensor | None = None  # skips not yet folded into group["skipped_steps"]
        self.fused = fused
        self._compiler = fused_step.Compiler()
        self._all_reduce: Callable[[Tensor, Any], None] = default_all_reduce
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            eps=eps,
            variant=variant,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            algorithm="mano",
            step=0,
            skipped_steps=0,
        )
        _check_group({**defaults})
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups and eager state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validates the group, joins the rotation phase of existing groups, creates its state.

        State is created here, not at the first step, so every rank holds the same keys (DCP)
        and ``get_state_dict``'s hidden initialisation step never runs.
        """
        if "wd" in param_group:
            param_group = dict(param_group)
            param_group["weight_decay"] = param_group.pop("wd")
        if self.param_groups and "step" not in param_group:
            param_group = {**param_group, "step": self.param_groups[0]["step"]}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["adamw_betas"] = tuple(group["adamw_betas"])
        self._check_splits(group)
        for i, p in enumerate(group["params"]):
            # deepspeed.zero.Init builds params with shape (0,) and the true shape in ds_shape.
            if group["algorithm"] == "mano" and len(getattr(p, "ds_shape", p.shape)) < 2:
                raise ValueError(
                    f"Mano updates matrices, but param {i} of group {len(self.param_groups) - 1} "
                    f"has shape {tuple(p.shape)}; put 0-/1-D params (biases, norm gains) in a group "
                    'with "algorithm": "adamw" (mano_param_groups(model) does this). Under DeepSpeed '
                    "ZeRO, build the optimizer through mano_dist.deepspeed (DeepSpeedMano) so it knows the layout. "
                    "With the Transformers Trainer, pass optimizer_cls_and_kwargs=(mano_dist.integrations.ManoFactory, "
                    "{...}) rather than the Mano class."
                )
            self._init_state(p, group["algorithm"])

    def _check_splits(self, group: dict[str, Any]) -> None:
        """``"splits"``: the row counts of the logical matrices stacked in each param of the group
        (a fused QKV: (q rows, k rows, v rows)); each block then steps as its own matrix."""
        if group.get("splits") is None:
            return
        index = len(self.param_groups) - 1
        if group["algorithm"] != "mano":
            raise ValueError(f'"splits" is a Mano option; param group {index} has "algorithm": {group["algorithm"]!r}')
        names = group.get("param_names") or [None] * len(group["params"])
        splits = check_splits(group["splits"], None, f"param group {index}")
        for i, (p, name) in enumerate(zip(group["params"], names)):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            check_splits(splits, shape[0], f"param {name or i} of group {index}, shape {shape}")
        group["splits"] = splits

    def _init_state(self, p: Tensor, algorithm: str) -> None:
        if not self.state[p]:
            self.state[p].update(momentum_state(p) if algorithm == "mano" else adamw_state(p))

    # ---------------------------------------------------------------- params swapped after construction
    # DeepSpeedMano turns this off: ZeRO-3 swaps sub-groups in and out of param_groups on purpose.
    _rebinds_swapped_params = True

    def _rebind_state(self) -> None:
        """State for params swapped into ``param_groups`` after construction; none for those
        they replaced.

        Accelerate's FSDP2 preparation (``Accelerator.prepare(model, optimizer)``, the order the
        Transformers Trainer uses) replaces every group's params by their sharded DTensors after
        the optimizer was built. The new params get fresh state shaped like them, i.e. local
        shards (never full-size), and the state of the replaced full-size params is released.
        Params merely left out of the groups (DeepSpeed swaps groups in one at a time) keep their
        state. State with history cannot follow a swap (nothing says which new tensor is which
        old one), so a swap after a step raises instead of silently restarting momentum.
        """
        if not self._rebinds_swapped_params:
            return
        live = {id(p): (p, group) for group in self.param_groups for p in group["params"]}
        fresh = [(p, group) for p, group in live.values() if not self.state.get(p)]
        if not fresh:
            return
        flat = [tuple(p.shape) for p, group in fresh if group["algorithm"] == "mano" and p.ndim < 2]
        if flat:
            raise ValueError(
                f"Params of shape {flat[0]} were swapped into a Mano group after construction: "
                "Mano needs each matrix's shape. FSDP1 (FullyShardedDataParallel) flattens params "
                "like this; use FSDP2 (fully_shard, or fsdp_version=2 in Accelerate/Transformers)."
            )
        stale = [p for p in self.state if id(p) not in live]
        if stale and any(group["step"] for group in self.param_groups):
            raise RuntimeError(
                f"Mano's params were replaced (e.g. by FSDP2 sharding in Accelerator.prepare) after "
                f"{max(group['step'] for group in self.param_groups)} optimizer steps: their momentum "
                "cannot be moved to the new tensors. Shard/prepare the model before the first step, "
                "or build the optimizer after it and load its state_dict."
            )
        for p in stale:
            del self.state[p]
        for p, group in fresh:
            self._init_state(p, group["algorithm"])

    def state_dict(self) -> dict[str, Any]:
        self._rebind_state()
        self._fold_skipped()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also moves AdamW step counts to their params' device (checkpoints written before they
        lived there hold CPU tensors, which torch's loader leaves on the CPU). Each group keeps
        the ``"splits"`` it was built with: they describe the model's params, not its history."""
        self._skipped = None
        splits = [group.get("splits") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mine in zip(self.param_groups, splits):  # structure comes from the code, not the file
            group.pop("splits", None)
            if mine is not None:
                group["splits"] = mine
        for p, state in self.state.items():
            step = state.get("step")
            if torch.is_tensor(step) and step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_skipped", None)
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("skipped_steps", 0)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients (reading it reads a device counter)."""
        self._fold_skipped()
        return int(self.param_groups[0]["skipped_steps"]) if self.param_groups else 0

    def _count_skipped(self, skip: Tensor) -> None:
        if self._skipped is None or self._skipped.device != skip.device:
            self._fold_skipped()
            self._skipped = torch.zeros((), dtype=torch.int64, device=skip.device)
        self._skipped.add_(skip)

    def _fold_skipped(self) -> None:
        """Adds the device counter of skips into every group's ``skipped_steps`` (a host read,
        made only when someone asks: ``skipped_steps``, ``state_dict``)."""
        if self._skipped is None or holds_no_values(self._skipped):
            return
        count = int(self._skipped.item())
        self._skipped = None
        for group in self.param_groups:
            group["skipped_steps"] += count

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        self._rebind_state()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups(self.param_groups)
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _step_groups(self, groups) -> None:
        """Updates ``groups``: the AdamW ones at once, the Mano ones in lockstep (one all-reduce
        of statistics per process group and round), all gated on the device by the skip flag.

        The compiled batches' first segments run before the decision (they only sum): their
        sums are those matrices' non-finite check (``fused_driver.first_statistics``), so only
        the other gradients (and those of batches whose whole step is one kernel) are read for
        it; the verdicts meet in one flag all-reduce."""
        fused = self._fused_active()
        checks = self.nonfinite != "ignore"
        batches, others = [], []
        for group in groups:
            if group["algorithm"] == "mano" and fused and self._fusable(group):
                matrices = self._matrices(group, self._with_grads(group))
                batches.extend(make_batches(group, matrices, group["lr"], reduced_axis(group), checks))
            else:
                others.append(group)
        skip = None
        if checks:
            found = first_statistics(batches, self._compiler, self._all_reduce)
            grads = [local(p.grad) for group in others for p in self._with_grads(group)]
            skip = self._skip_flag(found, unchecked_gradients(batches) + grads)
        matrix_steps = []
        for group in others:
            lr = skip_gate(group["lr"], skip)
            if group["algorithm"] != "mano":
                self._adamw_group(group, lr, skip, fused)
            else:
                matrix_steps.extend(self._mano_group(group, lr, skip))
        run_lockstep(matrix_steps, self._all_reduce)
        run_batches(batches, skip, self._compiler, self._all_reduce)

    def _fused_active(self) -> bool:
        """Whether this step takes the compiled path (see ``fused`` in the class docstring).

        Still so after compiling failed (the compiler then runs the same segments eagerly): the
        eager path issues its collectives in another order (the non-finite flag first), and a
        rank whose compile failed alone (its local shapes differ) must keep its peers' order."""
        if self.fused is not None:
            return bool(self.fused)
        return self._state_device().type not in ("cpu", "meta")

    def _fusable(self, group) -> bool:
        """Whether a Mano group's matrices are 2-D blocks (dense or DTensor shards)."""
        return True

    def _with_grads(self, group):
        return [p for p in group["params"] if p.grad is not None]

    def _matrices(self, group, params):
        """(weight, grad, momentum, layout) for every matrix of ``params``, as local views.

        The one place that maps parameters to matrices: a subclass whose params are not one
        matrix each (DeepSpeed's flat partitions hold fragments of many) overrides it.
        """
        out = []
        for p in params:
            if p.ndim < 2:
                raise ValueError(
                    f"Mano got a {p.ndim}-D tensor of {p.numel()} elements in a Mano group at step(): "
                    "it cannot know which matrix rows/columns it holds (DeepSpeed ZeRO's flat "
                    "partitions look like this). Under DeepSpeed use mano_dist.deepspeed.DeepSpeedMano "
                    'or "optimizer": {"type": "Mano"} in the config after `import mano_dist.deepspeed`.'
                )
            lay = layout_for(p)
            if group.get("splits") is None:
                out.append((lay.local(p), lay.local(p.grad), lay.local(self.state[p]["momentum_buffer"]), lay))
                continue
            # Row blocks are views; of the detached weight, because compiled code refuses in-place
            # updates of a no-grad view of a tensor that requires grad.
            views = (lay.local(p.detach()), lay.local(p.grad), lay.local(self.state[p]["momentum_buffer"]))
            out.extend((*(v[rows] for v in views), block) for rows, block in split_rows(p, lay, group["splits"]))
        return out

    def _mano_group(self, group, lr, skip):
        matrices = self._matrices(group, self._with_grads(group))
        if not matrices:
            return []
        directions = self._momentum_directions(
            [m[1] for m in matrices], [m[2] for m in matrices], group["momentum"], group["nesterov"], skip
        )
        axis = reduced_axis(group)
        return [
            (
                self._matrix_step(
                    weight, d, lay, axis=axis, variant=group["variant"],
                    lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
                ),
                lay,
            )
            for (weight, _, _, lay), d in zip(matrices, directions)
        ]

    def _momentum_directions(self, grads, bufs, momentum, nesterov, skip):
        """Momentum and directions of a group's matrices (a subclass may fuse the passes)."""
        return momentum_directions(grads, bufs, momentum, nesterov, skip)

    def _matrix_step(self, weight, direction, layout, **hyper):
        """One matrix's step generator (a subclass whose views are not 2-D blocks overrides it)."""
        return mano_matrix_step(weight, direction, layout, **hyper)

    def _adamw_group(self, group, lr, skip, fused=False):
        params = self._with_grads(group)
        if not params:
            return
        tensors = adamw_tensors(params, [self.state[p] for p in params])
        if fused:
            lr = fused_step.lr_tensor(lr, tensors[0][0].device)
            fused_step.fused_adamw(self._compiler, *tensors, lr=lr, skip=skip, **adamw_hyper(group))
        else:
            adamw_group_step(group, self.state, lr=lr, skip=skip)

    # ---------------------------------------------------------------- non-finite gradients
    def _shares_params_across_ranks(self) -> bool:
        """Whether ranks hold different parts of the params, so must decide skip/raise together.

        Decided from the params, never from which have gradients, so a rank without gradients
        still joins the all-reduce its peers enter."""
        return any(is_dtensor(p) for group in self.param_groups for p in group["params"])

    def _state_device(self) -> torch.device:
        """Where the step's own small tensors (the skip flag) live: the params' device."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _local_grads(self) -> list[tuple[int, int, Tensor]]:
        return [(gi, pi, local(p.grad)) for gi, group in enumerate(self.param_groups)
                for pi, p in enumerate(group["params"]) if p.grad is not None]

    def _found_nonfinite(self, found: list[Tensor] = (), grads: list[Tensor] | None = None) -> Tensor:
        """A 0-d bool tensor on the params' device: does any gradient, on any rank sharing the
        params, hold an inf or nan? One read of ``grads`` (default: every local gradient),
        together with ``found``, verdicts (0-d floats, 1 or 0) already reached on the others;
        no host read; when params are sharded, one 4-byte all-reduce so all ranks decide alike."""
        grads = [g for _, _, g in self._local_grads()] if grads is None else grads
        device = self._state_device()
        nonempty = [g for g in grads if g.numel()]
        verdicts = list(found)
        if nonempty and self._fused_active():
            verdicts.append(self._compiler(fused_step.flag_key(nonempty), any_nonfinite, nonempty))
        elif nonempty:
            verdicts.append(any_nonfinite(nonempty))
        if not verdicts:
            bad = torch.zeros((), device=device)
        else:
            bad = verdicts[0] if len(verdicts) == 1 else torch.stack([v.to(device) for v in verdicts]).amax()
        if bad.device != device:
            bad = bad.to(device)
        if self._shares_params_across_ranks() and dist.is_available() and dist.is_initialized():
            all_reduce_on_device(bad, self.process_group, op=dist.ReduceOp.MAX)
        return bad > 0

    def _skip_flag(self, found: list[Tensor] = (), grads: list[Tensor] | None = None) -> Tensor | None:
        """The device-side skip decision of this step (None with ``nonfinite="ignore"``);
        ``found`` and ``grads`` as for :meth:`_found_nonfinite`."""
        if self.nonfinite == "ignore":
            return None
        skip = self._found_nonfinite(found, grads)
        if self.nonfinite == "raise":
            if not holds_no_values(skip) and skip.item():  # the one host read "raise" costs
                self._raise_nonfinite()
        else:
            self._count_skipped(skip)
        return skip

    def _gradients_finite(self) -> bool:
        """The same decision as a Python bool (one host read), for callers that need it on the
        host (the Momo wrappers); raises under ``nonfinite="raise"``."""
        found = self._found_nonfinite()
        if holds_no_values(found) or not found.item():
            return True
        if self.nonfinite == "raise":
            self._raise_nonfinite()
        return False

    def _raise_nonfinite(self) -> None:
        named = self._local_grads()
        flags = nonfinite_flags([g for _, _, g in named]).tolist()
        nonempty = [item for item in named if item[2].numel()]
        for (gi, pi, g), bad in zip(nonempty, flags):
            if bad:
                p = self.param_groups[gi]["params"][pi]
                name = self.param_groups[gi].get("param_names", [None] * (pi + 1))[pi]
                label = f"'{name}'" if name else f"param {pi} of group {gi}"
                raise FloatingPointError(f"Non-finite gradient in {label} (shape {tuple(p.shape)}); nothing was updated")
        raise FloatingPointError("Non-finite gradient on another rank (or, with fused=True, a non-finite "
                                 "Mano weight or momentum buffer); nothing was updated")
