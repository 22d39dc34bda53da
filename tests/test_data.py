"""The data pipeline: the large presets' 32k SentencePiece tokenizes the bundled text offline,
the cache entry is reused, and a tokenizer larger than the model's vocabulary is refused."""

from __future__ import annotations

import numpy as np
import pytest

from launch.config import DataConfig
from launch.data import DataError, load_tokens, prepare


def test_llama32k_tokenizes_a_user_text_file_and_caches_it(tmp_path):
    text = tmp_path / "speech.txt"
    text.write_text("We the People of the United States, in Order to form a more perfect Union.\n" * 50)
    cfg = DataConfig(source=str(text), tokenizer="llama32k", cache_dir=str(tmp_path / "cache"))
    path = prepare(cfg, 32000)
    tokens = np.asarray(load_tokens(path))
    assert tokens.dtype == np.uint16 and 0 < tokens.max() < 32000
    assert tokens[-1] == 2  # SentencePiece </s> ends every document
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path.parent / "tokenizer.model"))
    assert sp.decode(tokens[:-1].tolist()) == text.read_text()
    before = path.stat().st_mtime_ns
    assert prepare(cfg, 32000) == path and path.stat().st_mtime_ns == before  # cached, not rewritten


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="model.vocab_size >= 32000"):
        prepare(DataConfig(source=str(text), tokenizer="llama32k", cache_dir=str(tmp_path)), 4096)
    with pytest.raises(DataError, match="neither 'bpe', 'llama32k' nor a .model file"):
        prepare(DataConfig(source=str(text), tokenizer="/no/such.model", cache_dir=str(tmp_path)), 4096)
