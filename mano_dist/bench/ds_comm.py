"""What the optimizer step communicates under DeepSpeed ZeRO: Mano vs DeepSpeed's Muon vs AdamW.

``python -m mano_dist.bench ds_comm [--world-size 2] [--width 256] [--layers 4]`` trains a small
MLP language model with each optimizer from the JSON config (stages 1-3, gloo, CPU) and records
every collective issued inside ``engine.backward()`` + ``engine.step()`` (``CollectiveCounter``;
DeepSpeed's Muon does its work in the gradient reduction on stages 1/2). AdamW's step is the
baseline (ZeRO's own parameter all-gather and gradient-norm reduction); what an optimizer adds on
top is its own traffic (``reduce_scatter`` is off for all: DeepSpeed's Muon
requires it at stage 3). Prints counts, bytes and step time, and the ratios, from one run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import torch
from torch import nn

from mano_dist.comm import CollectiveCounter

OPTIMIZERS = {
    "adamw": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
    "muon": {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, "torch_adam": True}},
    "mano": {"type": "Mano", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1}},
}


class MLPLM(nn.Module):
    def __init__(self, vocab, width, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), tokens.roll(-1, 1).flatten())


def _body(rank, world_size, width, layers, steps):
    import deepspeed

    import mano_dist.deepspeed  # noqa: F401 - registers "Mano"

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    results = {}
    for stage in (1, 2, 3):
        for name, opt in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = MLPLM(4 * width, width, layers)
            cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                   "gradient_clipping": 1.0, "steps_per_print": 10**9, "optimizer": opt,
                   "zero_optimization": {"stage": stage, "reduce_scatter": False},
                   "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            g = torch.Generator().manual_seed(rank)
            calls, seconds = [], 0.0
            for step in range(steps + 1):
                loss = engine(torch.randint(0, 4 * width, (4, 32), generator=g))
                if step == 0:  # warm-up
                    engine.backward(loss)
                    engine.step()
                    continue
                with CollectiveCounter() as cc:  # DeepSpeed's Muon works inside backward on stages 1/2
                    engine.backward(loss)
                    start = time.perf_counter()
                    engine.step()
                    seconds += time.perf_counter() - start
                calls += [(c.op, c.payload_bytes) for c in cc.calls]
            ops = {}
            for op, nbytes in calls:
                ops.setdefault(op, []).append(nbytes)
            results[(stage, name)] = (len(calls) / steps, sum(b for _, b in calls) / steps, seconds / steps,
                                      {op: (len(v) / steps, sum(v) / steps) for op, v in ops.items()})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mano_dist.multiprocess import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        res = run_distributed(_body, args.world_size, pathlib.Path(tmp), args.width, args.layers, args.steps,
                              env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=1200)[0]
    hidden = args.layers * args.width * args.width
    print(f"world size {args.world_size}, {args.layers} hidden matrices {args.width}x{args.width} "
          f"({hidden * 4 / 1e6:.2f} MB fp32), per optimizer step (engine.backward + engine.step); step ms = engine.step only:")
    print(f"{'stage':>5} {'optimizer':>9} {'collectives':>11} {'KB':>10} {'KB over AdamW':>13} {'step ms':>8}  by op")
    for stage in (1, 2, 3):
        base = res[(stage, "adamw")]
        for name in OPTIMIZERS:
            n, b, s, ops = res[(stage, name)]
            print(f"{stage:>5} {name:>9} {n:>11.1f} {b / 1e3:>10.1f} {(b - base[1]) / 1e3:>13.1f} {s * 1e3:>8.1f}  "
                  + ", ".join(f"{op} {c:g}x {v / 1e3:.1f} KB" for op, (c, v) in sorted(ops.items())))
        muon_extra = res[(stage, "muon")][1] - base[1]
        mano_extra = res[(stage, "mano")][1] - base[1]
        # ratios only where both add at least 1 KB (ZeRO-1/2 Muon adds a few bytes of bookkeeping)
        ratio = f"Muon/Mano = {muon_extra / mano_extra:.0f}x" if min(mano_extra, muon_extra) >= 1e3 else "no ratio"
        print(f"      stage {stage}: Muon adds {muon_extra:.0f} B, Mano {mano_extra:.0f} B "
              f"({ratio}); step time Mano/Muon = {res[(stage, 'mano')][2] / res[(stage, 'muon')][2]:.2f}")


if __name__ == "__main__":
    main()
