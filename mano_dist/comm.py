"""Count collectives and their bytes inside a block of code.

Communication is a feature of a sharded optimizer, so we measure it: every collective issued
through ``torch.distributed`` (c10d ops such as ``c10d.allreduce_``) or through functional
collectives (``_c10d_functional.*``, what DTensor redistribution uses) passes the dispatcher,
where a ``TorchDispatchMode`` sees it with its tensors. Used by the tests (a regression that
gathers a full matrix fails) and by ``python -m mano_dist.bench comm``.

    with CollectiveCounter() as cc:
        optimizer.step()
    cc.count("all_reduce"), cc.bytes("all_gather"), cc.summary()
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    _DTensor = None

# Dispatcher op name (namespace.name) -> kind. Names from torch 2.13.
_KINDS = {
    "all_reduce": (
        "c10d.allreduce_", "c10d.allreduce_coalesced_", "_c10d_functional.all_reduce",
        "_c10d_functional.all_reduce_", "_c10d_functional.all_reduce_coalesced",
        "_c10d_functional.all_reduce_coalesced_",
    ),
    "all_gather": (
        "c10d.allgather_", "c10d._allgather_base_", "c10d.allgather_coalesced_",
        "c10d.allgather_into_tensor_coalesced_", "_c10d_functional.all_gather_into_tensor",
        "_c10d_functional.all_gather_into_tensor_out", "_c10d_functional.all_gather_into_tensor_coalesced",
    ),
    "reduce_scatter": (
        "c10d.reduce_scatter_", "c10d._reduce_scatter_base_", "c10d.reduce_scatter_tensor_coalesced_",
        "_c10d_functional.reduce_scatter_tensor", "_c10d_functional.reduce_scatter_tensor_coalesced",
    ),
    "all_to_all": ("c10d.alltoall_", "c10d.alltoall_base_", "_c10d_functional.all_to_all_single"),
    "broadcast": ("c10d.broadcast_", "_c10d_functional.broadcast", "_c10d_functional.broadcast_"),
    "point_to_point": ("c10d.send", "c10d.recv_", "c10d.recv_any_source_"),
    "other": ("c10d.reduce_", "c10d.gather_", "c10d.scatter_", "c10d.barrier", "c10d.monitored_barrier_"),
}
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}

# Fraction of the payload each rank sends in a ring/bandwidth-optimal implementation.
_WIRE_FACTOR = {"all_reduce": lambda w: 2 * (w - 1) / w, "all_gather": lambda w: (w - 1) / w,
                "reduce_scatter": lambda w: (w - 1) / w, "all_to_all": lambda w: (w - 1) / w,
                "broadcast": lambda w: 1.0}


def _tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class Collective:
    """One collective call. ``payload_bytes`` is its logical size: the buffer for all-reduce and
    broadcast, the full (gathered / to-be-scattered) tensor for all-gather and reduce-scatter,
    the send buffer for all-to-all."""

    kind: str
    op: str
    payload_bytes: int
    group_size: int | None
    devices: tuple[str, ...] = ()  # device types of its tensors: NCCL takes only accelerator tensors

    def wire_bytes(self) -> float:
        """Bytes each rank sends with a bandwidth-optimal algorithm (ring), for reporting."""
        w = self.group_size or 1
        return self.payload_bytes * _WIRE_FACTOR.get(self.kind, lambda _: 1.0)(w) if w > 1 else 0.0


def _group_size(func, args, kwargs) -> int | None:
    """From the schema: ``process_group`` (c10d ops), ``group_size`` or ``group_name``
    (functional ops)."""
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.name == "group_size" and isinstance(value, int):
            return value
        if arg.name == "group_name" and isinstance(value, str):
            try:
                return int(torch.distributed.distributed_c10d._resolve_process_group(value).size())
            except Exception:  # noqa: BLE001 - unknown name: leave the size unknown
                return None
        if arg.name == "process_group" and value is not None:
            try:  # c10d ops carry the group as a TorchScript object
                return int(torch.distributed.ProcessGroup.unbox(value).size())
            except Exception:  # noqa: BLE001 - an opaque group object
                return None
    return None


class CollectiveCounter(TorchDispatchMode):
    """Records every collective dispatched while active (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls: list[Collective] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let torch.compile'd code (Mano(fused=True)) run under the counter: it sees the
        collectives issued around compiled graphs; a graph that held one would show it too."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # An op on DTensors: let DTensor handle it *under this mode*, so the collectives its
        # redistribution issues (e.g. gathering a matrix for a matmul) are seen too; calling
        # func here would run them with this mode switched off.
        if _DTensor is not None and any(issubclass(t, _DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = f"{func.namespace}.{func._schema.name.split('::')[-1]}"
        kind = _KIND_OF.get(name)
        if kind is None and func.namespace in ("c10d", "_c10d_functional") and name not in (
            "_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd"
        ):
            kind = "other"
        if kind is not None:
            tensors = [args[0] if args else None, args[1] if len(args) > 1 else None, out]
            payload = max(_tensor_bytes(t) for t in tensors)
            devices = tuple(sorted({t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}))
            self.calls.append(Collective(kind, name, payload, _group_size(func, args, kwargs), devices))
        return out

    def count(self, kind: str | None = None) -> int:
        return sum(1 for c in self.calls if kind is None or c.kind == kind)

    def bytes(self, kind: str | None = None) -> int:
        """Total payload bytes (see :class:`Collective`)."""
        return sum(c.payload_bytes for c in self.calls if kind is None or c.kind == kind)

    def wire_bytes(self, kind: str | None = None) -> float:
        return sum(c.wire_bytes() for c in self.calls if kind is None or c.kind == kind)

    def devices(self) -> set[str]:
        """Device types of every collective's tensors (a test asserts they are the params')."""
        return {d for c in self.calls for d in c.devices}

    def summary(self) -> dict[str, tuple[int, int]]:
        """{kind: (calls, payload bytes)}."""
        calls = Counter(c.kind for c in self.calls)
        return {k: (n, self.bytes(k)) for k, n in sorted(calls.items())}

    def reset(self) -> None:
        self.calls.clear()
