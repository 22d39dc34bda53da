"""Resume a DeepSpeed ZeRO checkpoint of Mano at a different data-parallel world size.

Same world size needs nothing: ``engine.save_checkpoint`` / ``load_checkpoint`` resume
bit-exactly (the flat state buffers and the rotation counter ``group["step"]`` are part of the
optimizer's state dict). DeepSpeed's universal-checkpoint converter hard-codes Adam's
``exp_avg``/``exp_avg_sq``, so for another world size we convert ourselves, in two steps:

1. :func:`consolidate` reads every rank's ``*_optim_states.pt`` of a stage 1/2/3 checkpoint and
   rebuilds each parameter's full fp32 weight and full optimizer state (``momentum_buffer`` for
   Mano, ``exp_avg``/``exp_avg_sq``/``step`` for AdamW), plus the param-group options and
   counters (the rotation phase), the LR scheduler's state, the engine's step/sample counters,
   the client state (e.g. the data position) and the per-rank RNG states :func:`save_run` wrote.
   Only Mano's own state exists: no dummy Adam buffers.
2. :func:`load_consolidated` writes the pieces this rank holds into a freshly built engine of any
   world size (and ZeRO stage), using the same fragment metadata the optimizer steps on, and
   restores the rest; it returns the client state.

:func:`save_run` / :func:`load_run` are what a training loop calls: the engine's checkpoint plus
RNG states, resumed by ``engine.load_checkpoint`` at the saved world size and through the
converter at any other. ``python -m mano_dist.deepspeed.checkpoint CKPT_DIR TAG OUT.pt`` runs
step 1 offline.
"""

from __future__ import annotations

import glob
import os
import re
import warnings

import torch

from ..checkpoint import rng
from .optimizer import DeepSpeedMano
from .zero_metadata import flat_partitions, zero_stage_of

_SCALAR_KEYS = ("step",)
# What engine.save_checkpoint writes into the model-states file besides the client state.
_ENGINE_KEYS = frozenset((
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version",
))
_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
RNG_DIR = "rng"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _rank_files(folder: str, pattern: str) -> list[str]:
    files = glob.glob(os.path.join(folder, pattern))
    rank = lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1))  # noqa: E731
    return sorted(files, key=rank)


def consolidate(checkpoint_dir: str, tag: str) -> dict:
    """Full fp32 params and optimizer state of a Mano ZeRO checkpoint, keyed by param name."""
    folder = os.path.join(checkpoint_dir, tag)
    optim_files = _rank_files(folder, "zero_pp_rank_*_mp_rank_00_optim_states.pt")
    if not optim_files:
        raise FileNotFoundError(f"no ZeRO optimizer states (zero_pp_rank_*_optim_states.pt) in {folder}")
    model_files = _rank_files(folder, "zero_pp_rank_*_mp_rank_00_model_states.pt") or [
        os.path.join(folder, "mp_rank_00_model_states.pt")
    ]
    model_states = _load(model_files[0])
    shapes = model_states["param_shapes"]
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(optim[0]["zero_stage"])
    base = optim[0]["base_optimizer_state"] if stage < 3 else optim[0]["optimizer_state_dict"]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
    params, state, group_of = {}, {}, {}
    group_of_flat = _group_of_flat(stage, base, len(shapes))
    for i, names in enumerate(shapes):
        pieces: dict[str, dict[str, list]] = {name: {} for name in names}
        for rank_sd in optim:
            if stage < 3:
                flat = rank_sd["single_partition_of_fp32_groups"][i]
                flat_state = rank_sd["base_optimizer_state"]["state"].get(i, {})
                located = [(n, a.start, a.numel) for n, a in rank_sd["param_slice_mappings"][i].items()]
            else:
                flat = rank_sd["fp32_flat_groups"][i]
                flat_state = rank_sd["optimizer_state_dict"]["state"].get(i, {})
                world = int(rank_sd["partition_count"])
                located, offset = [], 0
                for n, shape in names.items():
                    per_rank = -(-torch.Size(shape).numel() // world)
                    located.append((n, offset, per_rank))
                    offset += per_rank
                if offset != flat.numel():
                    raise ValueError(f"stage-3 group {i}: {flat.numel()} elements, expected {offset}")
            for name, start, numel in located:
                slot = pieces[name]
                slot.setdefault("fp32", []).append(flat[start : start + numel])
                for key, value in flat_state.items():
                    if key in _SCALAR_KEYS or value.dim() == 0:
                        slot[key] = value
                    else:
                        slot.setdefault(key, []).append(value[start : start + numel])
        group_index = group_of_flat[i]
        for name, shape in names.items():
            numel = torch.Size(shape).numel()
            held = sum(t.numel() for t in pieces[name]["fp32"])
            if held < numel or (stage < 3 and held != numel):
                raise ValueError(f"checkpoint pieces of {name} hold {held} elements, expected {numel}")
            full = {
                key: (torch.cat(v)[:numel].view(shape).clone() if isinstance(v, list) else v.clone())
                for key, v in pieces[name].items()
            }
            params[name] = full.pop("fp32")
            state[name] = full
            group_of[name] = group_index
    return {"params": params, "state": state, "groups": groups, "group_of": group_of, "zero_stage": stage,
            "world_size": len(optim_files), "scheduler": model_states.get("lr_scheduler"),
            **{k: model_states.get(k, 0) for k in _COUNTERS},
            "client_state": {k: v for k, v in model_states.items() if k not in _ENGINE_KEYS},
            "rng": {int(re.search(r"rank-(\d+)", f).group(1)): _load(f)
                    for f in glob.glob(os.path.join(folder, RNG_DIR, "rank-*.pt"))}}


def _group_of_flat(stage: int, base_state: dict, num_flats: int) -> list[int]:
    """The param group of each saved flat partition.

    Stages 1/2 save one flat partition per param group. Stage 3 saves one per *sub-group*
    (``sub_group_size`` elements; DeepSpeed's default of 1e9 gives a 1.3B model several per group)
    and its base optimizer's param groups list their sub-groups' indices as ``"params"``.
    """
    if stage < 3:
        if num_flats != len(base_state["param_groups"]):
            raise ValueError(f"{num_flats} flat partitions for {len(base_state['param_groups'])} param groups")
        return list(range(num_flats))
    mapping = {int(s): g for g, group in enumerate(base_state["param_groups"]) for s in group["params"]}
    if sorted(mapping) != list(range(num_flats)):
        raise ValueError(
            f"stage-3 checkpoint: param groups list sub-groups {sorted(mapping)}, the files hold {num_flats}"
        )
    return [mapping[s] for s in range(num_flats)]


def load_consolidated(engine, consolidated: dict) -> dict:
    """Write a consolidated checkpoint into ``engine`` (any world size, stage 1-3, Mano) and
    restore the run's scheduler, counters and RNG; returns the client state."""
    optimizer = engine.basic_optimizer
    if not isinstance(optimizer, DeepSpeedMano):
        raise TypeError("load_consolidated needs an engine built with Mano (DeepSpeedMano)")
    zopt = engine.optimizer
    zero_stage_of(zopt)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    lp_groups = zopt.fp16_groups if type(zopt).__name__.endswith("Stage3") else zopt.bit16_groups
    if len(optimizer.param_groups) != len(consolidated["groups"]):
        raise ValueError(
            f"checkpoint has {len(consolidated['groups'])} param groups, the engine "
            f"{len(optimizer.param_groups)}: build the engine with the same model and config"
        )
    for group, saved in zip(optimizer.param_groups, consolidated["groups"]):
        for key, value in saved.items():
            group[key] = value
    with torch.no_grad():
        for index, part in enumerate(flat_partitions(zopt)):
            flat_state = optimizer.state[part.flat]
            for f in part.fragments:
                if not f.numel:
                    continue
                name = names[id(lp_groups[index][f.param_index])]
                cut = slice(f.flat_start, f.flat_start + f.numel)
                src = slice(f.param_start, f.param_start + f.numel)
                part.flat[cut].copy_(consolidated["params"][name].reshape(-1)[src])
                for key, value in consolidated["state"][name].items():
                    if value.dim() == 0:
                        flat_state[key].copy_(value)
                    else:
                        flat_state[key][cut].copy_(value.reshape(-1)[src])
        _refresh_model_params(engine, zopt, consolidated["params"], names)
    return _restore_run_state(engine, consolidated)


def _restore_run_state(engine, consolidated: dict) -> dict:
    """Scheduler, engine counters and this rank's RNG states; returns the client state."""
    import torch.distributed as dist

    if consolidated.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(consolidated["scheduler"])
    for key in _COUNTERS:
        setattr(engine, key, consolidated.get(key, 0))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank in consolidated.get("rng", {}):
        rng.restore(consolidated["rng"][rank])
    else:
        warnings.warn(f"the checkpoint has no RNG state for rank {rank} (saved at world size "
                      f"{consolidated.get('world_size')}); RNG states were left as they are", stacklevel=3)
    return consolidated.get("client_state", {})


def _refresh_model_params(engine, zopt, full_params, names) -> None:
    """The module's (low-precision) params from the fp32 weights: whole tensors on stages 1/2,
    this rank's partition on stage 3."""
    import torch.distributed as dist

    for p in engine.module.parameters():
        name = names[id(p)]
        full = full_params[name].reshape(-1)
        if hasattr(p, "ds_tensor"):
            per_rank = p.partition_numel()
            start = dist.get_rank(p.ds_process_group) * per_rank
            real = max(0, min(per_rank, full.numel() - start))
            p.ds_tensor.data.view(-1)[:real].copy_(full[start : start + real])
        else:
            p.data.copy_(full.view_as(p))


def load_resharded(engine, checkpoint_dir: str, tag: str) -> dict:
    """``engine.load_checkpoint`` for a checkpoint saved at another world size (Mano, stage 1-3):
    params, optimizer state, LR scheduler, counters, RNG; returns the client state."""
    return load_consolidated(engine, consolidate(checkpoint_dir, tag))


def save_run(engine, checkpoint_dir: str, tag: str, client_state: dict | None = None) -> None:
    """``engine.save_checkpoint`` plus this rank's RNG states (DeepSpeed saves none)."""
    import torch.distributed as dist

    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state or {})
    rank = dist.get_rank() if dist.is_initialized() else 0
    folder = os.path.join(checkpoint_dir, tag, RNG_DIR)
    os.makedirs(folder, exist_ok=True)
    torch.save(rng.capture(), os.path.join(folder, f"rank-{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()


def load_run(engine, checkpoint_dir: str, tag: str | None = None) -> tuple[str, dict] | None:
    """Resume a run saved by :func:`save_run` at any data-parallel world size.

    Returns ``(path, client_state)``, or None when ``tag`` is None and there is no ``latest``.
    The saved world size is read from the file names, alike on every rank, so all ranks take
    the same path: ``engine.load_checkpoint`` when it equals this one (bit-exact) or the
    checkpoint is not partitioned (stage 0), else the converter (:func:`load_resharded`).
    """
    import torch.distributed as dist

    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(checkpoint_dir, tag)
    saved = len(_rank_files(folder, "zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if saved in (0, engine.dp_world_size):  # 0: ZeRO stage 0, the whole state in one file
        path, client = engine.load_checkpoint(checkpoint_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {folder}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = os.path.join(folder, RNG_DIR, f"rank-{rank}.pt")
        if os.path.isfile(rng_file):
            rng.restore(_load(rng_file))
        return path, {k: v for k, v in client.items() if k not in _ENGINE_KEYS}
    return folder, load_resharded(engine, checkpoint_dir, tag)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mano_dist.deepspeed.checkpoint",
                                 description="Consolidate a ZeRO checkpoint (Mano) into one file, for any world size.")
    ap.add_argument("ckpt_dir", metavar="CKPT_DIR")
    ap.add_argument("tag", metavar="TAG")
    ap.add_argument("out", metavar="OUT.pt")
    args = ap.parse_args(argv)
    torch.save(consolidate(args.ckpt_dir, args.tag), args.out)


if __name__ == "__main__":
    main()
