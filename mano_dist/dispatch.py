"""Count what a block of code asks of the device: dispatched ops and host reads.

On a GPU every eager op is a kernel launch (5-10 us of host time each) and every read of a
device value on the host (``.item()``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``)
waits for all queued work. A CPU build shows neither cost, so we count them instead:

- ops: every ``aten`` op that reaches the dispatcher (views included; compiled code dispatches
  only its fallbacks and collectives, so a fused step counts few);
- host reads: ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()``), ops whose
  output shape depends on values (``nonzero``, ``masked_select``, ...), plus calls of
  ``Tensor.tolist``/``cpu``/``numpy``, which a CPU build never dispatches (they are patched for
  the duration).

    with DispatchCounter() as dc:
        optimizer.step()
    dc.ops, dc.host_reads, dc.host_read_sites
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

# Ops that copy a value to the host, or whose output size depends on values (a sync on CUDA).
_SYNCING_OPS = {
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
    "unique_consecutive", "is_nonzero", "equal", "item", "repeat_interleave",
}
_PATCHED = ("tolist", "cpu", "numpy")


class DispatchCounter(TorchDispatchMode):
    """Counts dispatched ops (``ops``, ``by_op``) and host reads (``host_reads``, with the
    Python line that made each in ``host_read_sites``) while active."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.host_read_sites: list[str] = []
        self._originals: dict[str, object] = {}

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())

    @property
    def host_reads(self) -> int:
        return len(self.host_read_sites)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let torch.compile run under this mode: the counter then sees what the compiled
        artifact dispatches at run time (fallback ops, collectives), not the ops it fused."""
        return True

    def _record_host_read(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "mano_dist/dispatch.py" not in f.filename]
        ours = [f for f in frames if "site-packages" not in f.filename] or frames  # the caller, not torch
        site = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
        self.host_read_sites.append(f"{what} at {site}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _DTensor is not None and any(issubclass(t, _DTensor) for t in types):
            return NotImplemented  # let DTensor decompose under this mode; count its local ops
        name = func._schema.name.split("::")[-1]
        self.by_op[f"{func.namespace}.{name}"] += 1
        if name in _SYNCING_OPS:
            self._record_host_read(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _PATCHED:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def patched(tensor, *a, __name=name, __original=original, **k):
                self._record_host_read(f"Tensor.{__name}")
                return __original(tensor, *a, **k)

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()
        return super().__exit__(*exc)

    def reset(self) -> None:
        self.by_op.clear()
        self.host_read_sites.clear()
