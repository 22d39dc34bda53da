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

Completion and safety: after DeepSpeed's final barrier and every rank's RNG file, rank 0 writes
``<tag>/manifest.json`` (sizes, CRC-32s) and then ``<tag>/COMPLETE`` (DeepSpeed's own ``latest``
file is written before its final barrier, so it can name a tag another rank is still writing).
``load_run(tag=None)`` considers only tags with ``COMPLETE``, newest first, and falls back (every
rank alike, with a warning) past one that fails its checks. Before anything is unpickled, the
manifest is verified and every ``.pt`` file is read with ``weights_only=True`` and the allow-list
of :func:`mano_dist.checkpoint.safe.deepspeed_globals` (each rank a share, verdicts gathered);
DeepSpeed's own loader is switched to the same reading while it runs. Tags saved before the
marker existed load when named explicitly (a warning says their completeness is unknown).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from ..checkpoint import layout, rng, safe, validate
from ..checkpoint.checkpointer import _agree, _distributed, _fsync_dir, _rank, _remove, _views_if_different, _world
from ..checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)
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
COMPLETE = layout.COMPLETE
MANIFEST = layout.MANIFEST


def _allowed() -> list:
    return safe.deepspeed_globals() + safe.rng_globals()


def _load(path, mmap: bool = False):
    """A file of the checkpoint, read with ``weights_only=True`` and the DeepSpeed allow-list."""
    return safe.load(path, _allowed(), mmap=mmap)


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


def _marker(folder: Path) -> tuple[int, float] | None:
    """(global steps, save time) recorded in ``<tag>/COMPLETE``, None if the tag has none."""
    try:
        record = json.loads((folder / COMPLETE).read_text())
        return int(record["global_steps"]), float(record["saved_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # unreadable marker: oldest, still a candidate
        return -1, 0.0


def complete_tags(checkpoint_dir) -> list[str]:
    """Tags of ``checkpoint_dir`` marked complete by :func:`save_run`, oldest first (by the
    engine's step counter, then save time)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.endswith((layout.TRASH_SUFFIX, layout.TMP_SUFFIX)):
            key = _marker(folder)
            if key is not None:
                found.append((key, folder.name))
    return [tag for _, tag in sorted(found)]


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = complete_tags(root)
    for tag in tags[: max(0, len(tags) - keep_last)]:
        if tag != keep:
            _remove(root / tag)
    for path in root.iterdir():  # leftovers of killed deletes
        if path.name.endswith(layout.TRASH_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)


def _checksum_share(folder: Path) -> dict[str, list] | None:
    """Each rank CRCs 1/world of the tag's files; rank 0 gets them all (None without a group)."""
    import torch.distributed as dist

    if not _distributed():
        return None
    names = validate.manifest_files(folder)
    shares: list = [None] * _world()
    dist.all_gather_object(shares, validate.file_entries(folder, names[_rank() :: _world()]))
    return {name: entry for share in shares for name, entry in share.items()}


def save_run(engine, checkpoint_dir: str, tag: str, client_state: dict | None = None,
             keep_last: int | None = None) -> None:
    """``engine.save_checkpoint`` plus this rank's RNG states (DeepSpeed saves none), then a
    manifest and the ``COMPLETE`` marker (rank 0, once every rank has written). ``keep_last``
    (None or 0: keep all) removes the oldest complete tags beyond that many, each renamed to
    ``<tag>.deleting`` before it is deleted. A failure on any rank raises CheckpointError on
    every rank."""
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 or None, got {keep_last}")
    root, rank = Path(checkpoint_dir), _rank()
    folder = root / tag
    error = None
    if rank == 0 and folder.exists():  # an old save under this tag: its marker and stale files go first
        try:
            _remove(folder)
            if folder.exists():
                raise OSError("it is still there after the removal")
        except OSError as e:
            error = CheckpointError(f"Cannot remove the old {str(folder)!r} before saving tag {tag!r} again: {e}")
    _agree(error)
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state or {})
    error = None
    try:
        (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
        validate.save_atomic(rng.capture(), folder / RNG_DIR / f"rank-{rank}.pt")
    except Exception as e:  # noqa: BLE001 - every rank raises, none waits below
        error = CheckpointError(f"Cannot write the RNG state of rank {rank} into {str(folder)!r}: {e}")
    _agree(error)  # after this every rank's files are written
    known = _checksum_share(folder)
    error = None
    if rank == 0:
        try:
            validate.write_manifest(folder, known=known)
            record = {"tag": tag, "global_steps": int(engine.global_steps), "saved_at": time.time()}
            validate.write_atomic(folder / COMPLETE, (json.dumps(record) + "\n").encode())
            _fsync_dir(folder)
            _fsync_dir(root)
            if keep_last:
                _prune(root, keep_last, keep=tag)
        except Exception as e:  # noqa: BLE001
            error = CheckpointError(f"Could not mark DeepSpeed checkpoint {str(folder)!r} complete: {e}")
    _agree(error)


def _here_shapes(engine) -> dict[str, tuple]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}


def _shape_mismatch(folder: Path, model_states: dict, engine) -> CheckpointError | None:
    """The first parameter whose presence or shape differs between ``engine`` and the tag."""
    here = _here_shapes(engine)
    groups = model_states.get("param_shapes")
    if groups is not None:  # ZeRO >= 1: the trainable params, by group
        saved = {n: tuple(s) for g in (groups if isinstance(groups, list) else [groups]) for n, s in g.items()}
        saved.update({n: tuple(s) for n, s in (model_states.get("frozen_param_shapes") or {}).items()})
        here = {n: s for n, s in here.items() if n in saved or engine.module.get_parameter(n).requires_grad}
    else:  # stage 0: the module's state dict (params and buffers)
        buffers = set(model_states.get("buffer_names") or ())
        saved = {n: tuple(t.shape) for n, t in (model_states.get("module") or {}).items() if n not in buffers}
    for name, shape in here.items():
        if name not in saved:
            return CheckpointMismatchError(f"DeepSpeed checkpoint {str(folder)!r} does not match this model: "
                                           f"{name!r} (shape {list(shape)}) is not in the checkpoint")
        if saved[name] != shape:
            return CheckpointMismatchError(f"DeepSpeed checkpoint {str(folder)!r} does not match this model: "
                                           f"{name!r} has shape {list(saved[name])} in the checkpoint but "
                                           f"{list(shape)} here")
    extra = sorted(set(saved) - set(here))
    if extra:
        return CheckpointMismatchError(f"DeepSpeed checkpoint {str(folder)!r} does not match this model: the "
                                       f"checkpoint has {extra[0]!r} (shape {list(saved[extra[0]])}), which is not here")
    return None


def check_tag(folder, engine=None, rank: int = 0, world_size: int = 1) -> CheckpointError | None:
    """This rank's verdict on a tag folder, before anything of it is unpickled in full: it
    exists; if it has a manifest, it is marked complete and every file has its size (and this
    rank's share its CRC-32); this rank's share of the ``.pt`` files passes ``weights_only``
    loading (only the pickles are read); and, given an engine, the parameters match."""
    folder = Path(folder)
    if not folder.is_dir():
        return CheckpointNotFoundError(f"DeepSpeed checkpoint {str(folder)!r} does not exist")
    if (folder / MANIFEST).exists() or _marker(folder) is not None:
        if _marker(folder) is None:
            return IncompleteCheckpointError(f"DeepSpeed checkpoint {str(folder)!r} is incomplete (no {COMPLETE} "
                                             "marker): its save was interrupted or is still running")
        error = validate.check_files(folder, rank, world_size)
        if error is not None:
            return error
    files = sorted(str(f) for f in folder.rglob("*.pt"))
    if not files:
        return CheckpointNotFoundError(f"{str(folder)!r} holds no DeepSpeed checkpoint files (*.pt)")
    try:
        for i, f in enumerate(files):
            if i % world_size == rank:
                _load(f, mmap=True)
        if engine is not None:
            model_files = sorted(f for f in files if f.endswith("model_states.pt") and os.sep + RNG_DIR + os.sep not in f)
            if not model_files:
                return CheckpointNotFoundError(f"{str(folder)!r} holds no DeepSpeed model-states file")
            return _shape_mismatch(folder, _load(model_files[0], mmap=True), engine)
    except CheckpointError as e:
        return type(e)(f"DeepSpeed checkpoint {str(folder)!r}: {e}")
    return None


@contextlib.contextmanager
def _weights_only_loads(engine):
    """DeepSpeed's checkpoint engine reads with ``weights_only=False``: read with the allow-list
    instead while ``engine.load_checkpoint`` runs (the files were checked just before)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or type(ce).__name__ != "TorchCheckpointEngine":
        yield
        return
    allowed = _allowed()
    before = vars(ce).get("load")  # normally absent: the class's method
    ce.load = lambda path, map_location=None: safe.load(path, allowed, map_location=map_location)
    try:
        yield
    finally:
        if before is None:
            del ce.load
        else:
            ce.load = before


def _load_tag(engine, checkpoint_dir: str, tag: str) -> tuple[str, dict]:
    import torch.distributed as dist

    folder = Path(checkpoint_dir) / tag
    _agree(check_tag(folder, engine, _rank(), _world()))
    if _marker(folder) is None:
        warnings.warn(f"DeepSpeed checkpoint {str(folder)!r} has no {COMPLETE} marker (saved before mano_dist "
                      "wrote one): whether its save finished cannot be told", stacklevel=3)
    saved = len(_rank_files(str(folder), "zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if saved in (0, engine.dp_world_size):  # 0: ZeRO stage 0, the whole state in one file
        with _weights_only_loads(engine):
            path, client = engine.load_checkpoint(checkpoint_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {folder}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = folder / RNG_DIR / f"rank-{rank}.pt"
        if rng_file.is_file():
            rng.restore(_load(rng_file))
        return path, {k: v for k, v in client.items() if k not in _ENGINE_KEYS}
    return str(folder), load_resharded(engine, checkpoint_dir, tag)


def load_run(engine, checkpoint_dir: str, tag: str | None = None) -> tuple[str, dict] | None:
    """Resume a run saved by :func:`save_run` at any data-parallel world size.

    Returns ``(path, client_state)``, or None when ``tag`` is None and ``checkpoint_dir`` holds
    no checkpoint at all. ``tag=None`` takes the newest tag marked complete; one that fails its
    checks (corrupt, incomplete, refused by ``weights_only``) is skipped with a warning and the
    next older one tried, alike on every rank. CheckpointMismatchError (another model) is raised,
    never skipped; an explicit ``tag`` is never replaced. A folder with DeepSpeed checkpoints
    but no marked tag (saved before the marker existed) raises IncompleteCheckpointError naming
    the tag DeepSpeed's ``latest`` points at: pass it explicitly.

    The saved world size is read from the file names, alike on every rank, so all ranks take
    the same path: ``engine.load_checkpoint`` when it equals this one (bit-exact) or the
    checkpoint is not partitioned (stage 0), else the converter (:func:`load_resharded`).
    """
    if tag is not None:
        return _load_tag(engine, checkpoint_dir, tag)
    tags = complete_tags(checkpoint_dir)
    seen = _views_if_different(tags)
    if seen is not None:
        _agree(CheckpointError(f"Ranks see different complete DeepSpeed checkpoints in {checkpoint_dir!r}: {seen}; "
                               "the folder must be on a file system shared by every rank"))
    if not tags:
        latest = Path(checkpoint_dir) / "latest"
        error = None
        if latest.is_file():
            named = latest.read_text().strip()
            error = IncompleteCheckpointError(
                f"{checkpoint_dir!r} holds DeepSpeed checkpoints but none marked {COMPLETE} by save_run (saved "
                f"before mano_dist marked them, or every save was interrupted); DeepSpeed's 'latest' names "
                f"{named!r}: load it explicitly (tag={named!r}; the trainer: --resume {os.path.join(checkpoint_dir, named)})")
        _agree(error)
        return None
    failures = []
    for candidate in reversed(tags):
        try:
            return _load_tag(engine, checkpoint_dir, candidate)
        except CheckpointMismatchError:
            raise
        except CheckpointError as e:
            failures.append(f"{candidate!r}: {e}")
            warnings.warn(f"Skipping DeepSpeed checkpoint {candidate!r} in {checkpoint_dir!r}, it cannot be "
                          f"loaded: {e}; trying the next older one", stacklevel=2)
    raise CheckpointError(f"No DeepSpeed checkpoint in {checkpoint_dir!r} can be loaded: " + " | ".join(failures))


def main(argv=None) -> int:
    import argparse

    from ..checkpoint.convert import write_file

    ap = argparse.ArgumentParser(prog="python -m mano_dist.deepspeed.checkpoint",
                                 description="Consolidate a ZeRO checkpoint (Mano) into one file, for any world size.")
    ap.add_argument("ckpt_dir", metavar="CKPT_DIR")
    ap.add_argument("tag", metavar="TAG")
    ap.add_argument("out", metavar="OUT.pt")
    args = ap.parse_args(argv)
    try:
        error = check_tag(Path(args.ckpt_dir) / args.tag)
        if error is not None:
            raise error
        write_file(consolidate(args.ckpt_dir, args.tag), Path(args.out))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
