"""The Mano optimizer: param groups, eager state, the rotation counter, the AdamW fallback and
the non-finite policy. The math lives in ``functional.py``; where elements live, in ``layouts.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .functional import VARIANTS, adamw_step, mano_matrix_step, momentum_directions
from .layouts import is_distributed_tensor, layout_for
from .lockstep import default_all_reduce, holds_no_values, run_lockstep

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


def _default_device() -> torch.device:
    """Where a rank with no local gradients puts its flag (NCCL needs a CUDA tensor)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nonfinite_flags(grads: list[Tensor]) -> Tensor:
    """One bool per tensor: does it hold an inf or nan? (aminmax is ~20x faster than
    ``_foreach_norm(inf)`` on CPU, and exact.)"""
    extremes = [torch.stack(torch.aminmax(g)).float() for g in grads if g.numel()]
    flags = torch.zeros(len(grads), dtype=torch.bool)
    if extremes:
        finite = torch.isfinite(torch.stack(extremes)).all(dim=1).cpu()
        flags[[i for i, g in enumerate(grads) if g.numel()]] = ~finite
    return flags


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
        nonfinite: ``"skip"`` (default: a step with any non-finite gradient changes nothing and is
            counted in ``skipped_steps``), ``"raise"`` (``FloatingPointError`` naming the
            parameter) or ``"ignore"`` (no check, no synchronisation). On sharded params the
            decision is taken collectively, so every rank skips or raises together.
        process_group: group over which that decision is shared (default: the world).
        mano_params, adamw_params, wd: the official Mano code's keywords, so its users switch
            by changing an import.

    The rotation axis is k = t mod 2 where t counts optimizer steps; it is kept per param group
    as ``group["step"]`` (a number, so it survives ``state_dict`` and DCP), and every group
    advances once per ``step()`` call on it, also when none of its params has a gradient.
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

    def _init_state(self, p: Tensor, algorithm: str) -> None:
        state = self.state[p]
        if state:
            return
        if algorithm == "mano":
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

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
        return super().state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step", 0)
            group.setdefault("skipped_steps", 0)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients."""
        return int(self.param_groups[0]["skipped_steps"]) if self.param_groups else 0

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        self._rebind_state()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "ignore" and not self._gradients_finite():
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss
        matrix_steps = []
        for group in self.param_groups:
            if group["algorithm"] == "mano":
                matrix_steps.extend(self._mano_group(group))
            else:
                self._adamw_group(group)
            group["step"] += 1
        run_lockstep(matrix_steps, self._all_reduce)
        return loss

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
            out.append((lay.local(p), lay.local(p.grad), lay.local(self.state[p]["momentum_buffer"]), lay))
        return out

    def _mano_group(self, group):
        matrices = self._matrices(group, self._with_grads(group))
        if not matrices:
            return []
        directions = self._momentum_directions(
            [m[1] for m in matrices], [m[2] for m in matrices], group["momentum"], group["nesterov"]
        )
        axis = int(group["step"]) % 2
        return [
            (
                self._matrix_step(
                    weight, d, lay, axis=axis, variant=group["variant"],
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                ),
                lay,
            )
            for (weight, _, _, lay), d in zip(matrices, directions)
        ]

    def _momentum_directions(self, grads, bufs, momentum, nesterov):
        """Momentum and directions of a group's matrices (a subclass may fuse the passes)."""
        return momentum_directions(grads, bufs, momentum, nesterov)

    def _matrix_step(self, weight, direction, layout, **hyper):
        """One matrix's step generator (a subclass whose views are not 2-D blocks overrides it)."""
        return mano_matrix_step(weight, direction, layout, **hyper)

    def _adamw_group(self, group):
        params = self._with_grads(group)
        if not params:
            return
        local = lambda t: t.to_local() if is_distributed_tensor(t) else t  # noqa: E731
        states = [self.state[p] for p in params]
        beta1, beta2 = group["adamw_betas"]
        adamw_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["adamw_eps"], weight_decay=group["weight_decay"],
        )

    # ---------------------------------------------------------------- non-finite gradients
    def _shares_params_across_ranks(self, named) -> bool:
        """Whether ranks hold different parts of the params, so must decide skip/raise together."""
        return any(is_distributed_tensor(p) for _, _, p in named)

    def _gradients_finite(self) -> bool:
        """True when every gradient is finite on every rank that shares the params.

        One read of every gradient (min/max propagate nan and reach inf; unlike a sum they
        cannot overflow on finite values) and one host sync per step, plus, when params are
        sharded, one 4-byte all-reduce so all ranks decide alike.
        """
        named = [
            (gi, pi, p)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None
        ]
        grads = [p.grad.to_local() if is_distributed_tensor(p.grad) else p.grad for _, _, p in named]
        sharded = self._shares_params_across_ranks(named)
        if not grads and not sharded:
            return True
        flags = _nonfinite_flags(grads)
        bad_local = flags.any().float() if grads else torch.zeros(())
        bad = bad_local.to(grads[0].device if grads else _default_device(), copy=True)
        if sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.process_group)
        if holds_no_values(bad) or not bad.item():  # a dry run on fake tensors takes the full step
            return True
        if self.nonfinite == "raise":
            if bad_local.item():
                first = int(flags.nonzero()[0])
                gi, pi, p = named[first]
                name = self.param_groups[gi].get("param_names", [None] * (pi + 1))[pi]
                label = f"'{name}'" if name else f"param {pi} of group {gi}"
                raise FloatingPointError(
                    f"Non-finite gradient in {label} (shape {tuple(p.shape)}); nothing was updated"
                )
            raise FloatingPointError("Non-finite gradient on another rank; nothing was updated")
        return False
