"""Optimizer memory: state bytes and the peak memory a ``step()`` adds, Mano vs AdamW vs Muon.

Each optimizer runs in its own process on the same tensors (LLaMA-1.3B hidden matrices, a few
blocks by default). The state is counted exactly from the optimizer's tensors. The step's peak
is the high-water mark of the process during the second ``step()`` minus its memory just
before it: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the kernel's resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc told to return
large blocks at once (``MALLOC_MMAP_THRESHOLD_``) so freed temporaries do not linger. Usage::

    python -m mano_dist.bench memory [--model 1.3b] [--layers 2]
    python -m mano_dist.bench memory --engine deepspeed [--help]   # ZeRO partitions: ds_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from .proc_memory import peak_bytes, reset_peak, resident_bytes
from .step import LLAMA_SHAPES, llama_matrix_shapes, make_params, state_bytes

OPTIMIZERS = ("adamw", "mano-v2", "mano-both", "muon")


def _build(name: str, params):
    from mano_dist import Mano

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    if name.startswith("mano-"):
        return Mano(params, lr=1e-3, variant=name.split("-", 1)[1], nonfinite="ignore")
    if name == "muon":
        return torch.optim.Muon(params, lr=1e-3, weight_decay=0.1)
    raise ValueError(name)


def _child(name: str, model: str, layers: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = make_params(llama_matrix_shapes(model, layers))
    if device.type == "cuda":
        params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
    opt = _build(name, params)
    opt.step()  # AdamW and Muon create their state lazily: measure the second step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resident_bytes()
        reset_peak()
        opt.step()
        peak = peak_bytes() - before
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"state": state_bytes(opt), "step_peak": max(peak, 0), "params": param_bytes}


def main(argv=None) -> None:
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    known, rest = engine.parse_known_args(argv)
    if known.engine == "deepspeed":
        from . import ds_memory

        return ds_memory.main(rest)
    ap = argparse.ArgumentParser(prog="python -m mano_dist.bench memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(LLAMA_SHAPES), default="1.3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch",
                    help="deepspeed: ZeRO partitions, Mano vs AdamW/DeepSpeedCPUAdam (see ds_memory.py)")
    args = ap.parse_args(rest)
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.layers)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for name in args.optimizers:
        out = subprocess.run([sys.executable, "-m", "mano_dist.bench", "memory", "--child", name,
                              "--model", args.model, "--layers", str(args.layers)],
                             env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    params = next(iter(results.values()))["params"]
    print(f"LLaMA-{args.model} hidden matrices, {args.layers} block(s): params {params / 2**20:,.0f} MiB fp32")
    print(f"{'optimizer':<11}{'state MiB':>11}{'x params':>10}{'vs AdamW':>10}{'step peak MiB':>15}{'vs AdamW':>10}")
    base = results.get("adamw")
    for name, r in results.items():
        vs_state = f"{r['state'] / base['state']:>9.2f}x" if base else f"{'-':>10}"
        vs_peak = f"{r['step_peak'] / base['step_peak']:>9.2f}x" if base and base["step_peak"] else f"{'-':>10}"
        print(f"{name:<11}{r['state'] / 2**20:>11,.1f}{r['state'] / r['params']:>10.2f}{vs_state}"
              f"{r['step_peak'] / 2**20:>15,.1f}{vs_peak}")
    print("step peak: memory above the pre-step level during one steady-state step() (temporaries)")


if __name__ == "__main__":
    main()
