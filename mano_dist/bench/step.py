"""Single-process optimizer step time and state size: Mano vs AdamW (foreach) vs torch.optim.Muon.

The tensors are the hidden weight matrices of a LLaMA model (default: the 130M preset, 84
matrices, 85M elements), with random gradients; every optimizer steps the same tensors in the
same run, so the printed ratios are meaningful on a noisy machine even when the absolute times
are not. Usage::

    python -m mano_dist.bench step [--model 130m] [--steps 10] [--variants v2 v1 both]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mano_dist import Mano

# (layers, hidden, ffn) of the paper's LLaMA presets (shared/notes/algorithm.md).
LLAMA_SHAPES = {
    "130m": (12, 768, 2048),
    "350m": (24, 1024, 2736),
    "1.3b": (24, 2048, 5461),
}


def llama_matrix_shapes(model: str, layers: int | None = None) -> list[tuple[int, int]]:
    n_layers, d, ffn = LLAMA_SHAPES[model]
    block = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]  # q k v o, gate up, down ([out, in])
    return block * (layers or n_layers)


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def time_steps(opt, params, grads, steps: int, warmup: int = 1) -> list[float]:
    """Seconds per step; grads are restored before each step (Mano's Nesterov writes into them)."""
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mano_dist.bench step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(LLAMA_SHAPES), default="130m")
    ap.add_argument("--layers", type=int, default=None, help="use fewer blocks (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--muon-steps", type=int, default=2, help="Muon is slow on CPU: fewer timed steps")
    ap.add_argument("--variants", nargs="+", default=["v2", "v1", "both"])
    ap.add_argument("--no-muon", action="store_true")
    args = ap.parse_args(argv)

    shapes = llama_matrix_shapes(args.model, args.layers)
    params = make_params(shapes)
    grads = [p.grad.clone() for p in params]
    numel = sum(p.numel() for p in params)
    print(f"LLaMA-{args.model} hidden matrices: {len(shapes)} tensors, {numel / 1e6:.1f}M elements, "
          f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")

    results = {}
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    results["adamw"] = (statistics.median(time_steps(adamw, params, grads, args.steps)), state_bytes(adamw))
    del adamw
    for variant in args.variants:
        mano = Mano(params, lr=1e-3, variant=variant)
        results[f"mano-{variant}"] = (statistics.median(time_steps(mano, params, grads, args.steps)), state_bytes(mano))
        del mano
    if not args.no_muon and hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon(params, lr=1e-3, weight_decay=0.1)
        results["muon"] = (statistics.median(time_steps(muon, params, grads, args.muon_steps)), state_bytes(muon))
        del muon

    t_adamw, b_adamw = results["adamw"]
    t_muon = results.get("muon", (None,))[0]
    print(f"{'optimizer':<12}{'step ms':>10}{'vs AdamW':>10}{'Muon / it':>11}{'state MB':>10}{'vs AdamW':>10}")
    for name, (t, b) in results.items():
        vs_muon = f"{t_muon / t:>10.1f}x" if t_muon else f"{'-':>11}"
        print(f"{name:<12}{t * 1e3:>10.1f}{t / t_adamw:>9.2f}x{vs_muon}{b / 2**20:>10.1f}{b / b_adamw:>9.2f}x")
    print("targets: Mano step <= 1.00x AdamW, Muon/Mano >= 10x, Mano state = 0.50x AdamW")


if __name__ == "__main__":
    main()
