"""What the trainer reports besides the loss: throughput, ETA, model FLOPs utilisation, memory, the
optimizer's time, and the sinks it writes to (JSONL always, TensorBoard scalars when
``train.tensorboard = true``).

MFU = achieved model FLOPs / the device's peak dense FLOPs in the run's compute dtype (bf16, tf32
or fp32; ``PEAK_FLOPS``). Model FLOPs per token are the
usual 6 N (forward + backward over every weight that multiplies: all parameters but the
embedding lookup) plus attention's 12 x layers x dim x seq_len (PaLM, appendix B); activation
recomputation is not counted, so checkpointing lowers MFU, as it should.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident set so far (``ru_maxrss``, KiB on Linux), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


GiB = 2**30


def cuda_memory_gib(device) -> dict[str, float]:
    """This process's caching-allocator peaks (``max_memory_allocated``: tensors;
    ``max_memory_reserved``: the blocks it holds, fragmentation included) and the device's used
    and total memory from ``cudaMemGetInfo`` (every process, the CUDA context and NCCL's buffers
    too: what the allocator cannot see). Host-side queries: none waits for the GPU."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {"mem_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
            "mem_device_used_gib": (total - free) / GiB, "mem_device_total_gib": total / GiB}


class Stopwatch:
    """Times a region without making the host wait: on CUDA two timing events on the current
    stream, read by ``seconds()`` (which waits for the end event, so call it when logging); on
    other devices ``time.perf_counter``, where the work is done when the call returns."""

    def __init__(self, device):
        import torch

        cuda = torch.device(device).type == "cuda"
        self._events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) if cuda else None
        self._t0 = self._seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self._events:
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._events:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._t0

    def seconds(self) -> float:
        if not self._events:
            return self._seconds
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end) / 1e3


# Peak dense (no sparsity) FLOP/s per GPU and compute dtype, from NVIDIA's datasheets and product
# pages (they print the sparse figure for tensor cores; dense is half of it):
# - A100 datasheet (SXM4 and PCIe, 40/80 GB); H100 and H200 datasheets (SXM, PCIe, NVL);
#   H800 SXM/PCIe datasheets (H100's compute); GH200 datasheet (its H100 GPU); L40S, L40, L4 and
#   A10 datasheets;
# - B200 and GB200: "Individual Blackwell GPU Specifications" on nvidia.com's Blackwell
#   architecture page (HGX B200: BF16 4.5 PF, TF32 2.2 PF sparse, FP32 75 TF; GB200 NVL72:
#   5 PF, 2.5 PF, 80 TF);
# - H20: NVIDIA's H20 product brief, not on nvidia.com: as widely reported, dense BF16 148 TF,
#   TF32 74 TF, FP32 44 TF;
# - A10G: AWS's part, in no NVIDIA datasheet; bf16 70 TF as before, no fp32 figure (no MFU).
# "bf16" is the bf16/fp16 tensor core, "tf32" fp32 matmuls on tensor cores
# (``torch.set_float32_matmul_precision("high")``), "fp32" the plain FP32 units.
# Keys are the tokens of ``torch.cuda.get_device_name()`` (split at spaces and dashes) that must
# all be present: "L4" matches "NVIDIA L4" but not "NVIDIA L40", "H20" not "H200"; the entry
# with the most tokens wins, so "H100 PCIe" beats "H100".
PEAK_FLOPS = {
    ("A100",): {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    ("H100",): {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM
    ("H100", "PCIe"): {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    ("H100", "NVL"): {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    ("H200",): {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM
    ("H200", "NVL"): {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    ("H800",): {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM
    ("H800", "PCIe"): {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    ("H20",): {"bf16": 148e12, "tf32": 74e12, "fp32": 44e12},
    ("GH200",): {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    ("B200",): {"bf16": 2250e12, "tf32": 1100e12, "fp32": 75e12},
    ("GB200",): {"bf16": 2500e12, "tf32": 1250e12, "fp32": 80e12},
    ("L40S",): {"bf16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    ("L40",): {"bf16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    ("L4",): {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    ("A10",): {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    ("A10G",): {"bf16": 70e12},
}
DTYPES = ("bf16", "tf32", "fp32")


def _name_tokens(device_name: str) -> set[str]:
    return {t for t in re.split(r"[^0-9A-Z]+", device_name.upper()) if t}


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of ``device_name`` (``torch.cuda.get_device_name()``) in ``dtype``
    (bf16, tf32 or fp32), or None for a GPU or dtype not in the table (then no MFU is logged)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokens = _name_tokens(device_name)
    matches = [key for key in PEAK_FLOPS if {k.upper() for k in key} <= tokens]
    if not matches:
        return None
    return PEAK_FLOPS[max(matches, key=len)].get(dtype)


def peak_bf16_flops(device_name: str) -> float | None:
    return peak_flops(device_name, "bf16")


def compute_dtype(bf16: bool) -> str:
    """The dtype the matmuls run in, for the MFU peak: bf16, else fp32 on tensor cores (tf32)
    when torch allows it for fp32 matmuls, else plain fp32."""
    import torch

    if bf16:
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def flops_per_token(model_cfg, n_params: int, seq_len: int) -> float:
    """6 N for the weights (N without the embedding table) plus the attention scores and values."""
    n_matmul = n_params - model_cfg.vocab_size * model_cfg.dim
    return 6 * n_matmul + 12 * model_cfg.n_layers * model_cfg.dim * seq_len


def eta_seconds(steps_done: int, steps_left: int, seconds_spent: float) -> float:
    """Remaining time at the mean step time so far (the first step, which compiles and warms
    up, is left out of the mean by the caller when more are available)."""
    return steps_left * seconds_spent / max(1, steps_done)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path | str) -> list[dict]:
    """The records of a run (its folder or its ``metrics.jsonl``), one per step, in step order.

    The reader of what :class:`MetricsWriter` writes, and the one rule every consumer follows: a
    resumed run appends, so steps after its checkpoint are logged twice and the later record
    (the run that went on) wins; blank lines are ignored."""
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    with open(path) as f:
        by_step = {r["step"]: r for r in (json.loads(line) for line in f if line.strip())}
    return [by_step[step] for step in sorted(by_step)]


class MetricsWriter:
    """One JSON line per step (a resumed run appends: re-logged steps win, see
    :func:`read_metrics`) and, optionally, the same numbers as TensorBoard scalars under
    ``<out_dir>/tensorboard``."""

    def __init__(self, out: Path, append: bool, tensorboard: bool):
        self.jsonl = open(out / METRICS_FILE, "a" if append else "w")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
