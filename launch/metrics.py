"""What the trainer reports besides the loss: throughput, ETA, model FLOPs utilisation, and the
sinks it writes to (JSONL always, TensorBoard scalars when ``train.tensorboard = true``).

MFU = achieved model FLOPs / the device's peak dense bf16 FLOPs. Model FLOPs per token are the
usual 6 N (forward + backward over every weight that multiplies: all parameters but the
embedding lookup) plus attention's 12 x layers x dim x seq_len (PaLM, appendix B); activation
recomputation is not counted, so checkpointing lowers MFU, as it should.
"""

from __future__ import annotations

import json
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident set so far (``ru_maxrss``, KiB on Linux), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

# Peak dense bf16 tensor-core FLOP/s per device (vendor datasheets, no sparsity), matched by
# substring of ``torch.cuda.get_device_name()``; the first match wins, so specific names first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


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


class MetricsWriter:
    """One JSON line per step (a resumed run appends: re-logged steps win) and, optionally, the
    same numbers as TensorBoard scalars under ``<out_dir>/tensorboard``."""

    def __init__(self, out: Path, append: bool, tensorboard: bool):
        self.jsonl = open(out / "metrics.jsonl", "a" if append else "w")
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
