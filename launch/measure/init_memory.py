"""Peak host memory per rank while the model is built and sharded: the old way (every rank
builds the whole fp32 model, then ``fully_shard``) against ``build_model`` (meta, then each
rank initialises its shards), measured in one command.

    python -m launch.measure.init_memory --config configs/llama_350m.toml [--nproc 2]

Each way runs in fresh processes under torchrun; a rank reports its peak resident set
(``ru_maxrss``) after the build minus the peak before it (imports, process group).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _worker(config: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    from ..config import load_config
    from ..trainer.metrics import peak_rss_gib
    from ..trainer.model import Llama, build_model
    from ..trainer.parallel import build_mesh, setup_distributed, shard_model

    cfg = load_config(config)
    rank, world, device = setup_distributed()
    mesh = build_mesh(device, world, 1)
    before = peak_rss_gib()
    if mode == "full":
        torch.manual_seed(cfg.train.seed)
        model = Llama(cfg.model).to(device)
        shard_model(model, mesh)
    else:
        model = build_model(cfg, mesh, device)
    peaks = [None] * world
    dist.all_gather_object(peaks, (before, peak_rss_gib()))
    if rank == 0:
        print("RESULT " + " ".join(f"{after - b:.3f}" for b, after in peaks), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_350m.toml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", choices=("full", "lean"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.config, args.worker)
        return 0
    results = {}
    for mode in ("full", "lean"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "launch.measure.init_memory", "--config", args.config, "--worker", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout + out.stderr, file=sys.stderr)
            return 1
        results[mode] = [float(v) for v in line[0].split()[1:]]
    print(f"{args.config}, {args.nproc} ranks: peak host memory added by building the model, GiB per rank")
    for mode, label in (("full", "whole fp32 model, then fully_shard"), ("lean", "build_model (meta, own shards)")):
        print(f"  {label:38s} " + ", ".join(f"{v:.2f}" for v in results[mode]))
    print(f"  ratio lean / full: {max(results['lean']) / max(results['full']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
