"""Bad input is refused at the start, with a message naming what is wrong, on every rank alike:
every hyperparameter out of its range (``--check`` exits 2), ``optim.grad_clip = 0`` meaning no
clipping (never a frozen or uphill step), the process-group timeout reaching
``init_process_group``, a prepared folder with a truncated or missing shard, a ``../`` name or
token ids beyond the vocabulary, non-UTF-8 or empty text inputs, and a rank-0 data preparation
that fails: every rank raises the same DataError at once, none waits for a timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import DataConfig, TrainConfig, load_config
from launch.data.loader import DataError, open_dataset
from launch.data.loader import cache_tokens as prepare_in_job
from launch.data.sources import InputWarning, SourceError, check_inputs

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096


# ---- hyperparameters -----------------------------------------------------------------------------

BAD = [
    ("optim.lr=-1e-3", "optim.lr must be > 0 and finite, got -0.001"),
    ("optim.lr=0", "optim.lr must be > 0 and finite, got 0.0"),
    ("optim.lr=nan", "optim.lr must be > 0 and finite, got nan"),
    ("optim.lr=inf", "optim.lr must be > 0 and finite, got inf"),
    ("optim.adamw_lr=-1.0", "optim.adamw_lr must be unset (= optim.lr) or > 0 and finite, got -1.0"),
    ("optim.adamw_lr=nan", "optim.adamw_lr must be unset (= optim.lr) or > 0 and finite, got nan"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0 and finite, got -0.1"),
    ("optim.weight_decay=nan", "optim.weight_decay must be >= 0 and finite, got nan"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1.0"),
    ("optim.momentum=-0.5", "optim.momentum must be in [0, 1), got -0.5"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim.betas=[nan, 0.95]", "optim.betas[0] must be in [0, 1), got nan"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers [beta1, beta2], got (0.9,)"),
    ("optim.betas=0.9", "--set: optim.betas: expected a list like [0.9, 0.95], got 0.9"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio must be in [0, 1], got -0.1"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0 and finite (the largest global gradient norm), "
                           "or 0 for no clipping, got -1.0"),
    ("optim.grad_clip=nan", "optim.grad_clip must be > 0 and finite (the largest global gradient norm), "
                            "or 0 for no clipping, got nan"),
    ("optim.grad_clip=inf", "optim.grad_clip must be > 0 and finite (the largest global gradient norm), "
                            "or 0 for no clipping, got inf"),
    ("optim.variant=v3", "optim.variant must be one of v1, v2, both, got 'v3'"),
    ("train.keep_last=-1", "train.keep_last must be >= 0 (0 keeps every checkpoint), got -1"),
    ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ("train.steps=0", "train.steps must be > 0, got 0"),
    ("train.global_batch=-16", "train.global_batch must be > 0, got -16"),
    ("train.micro_batch=-1", "train.micro_batch must be >= 0 (0: the whole per-rank batch), got -1"),
    ("train.out_dir=", "train.out_dir must be a non-empty path, got ''"),
    ("data.seq_len=0", "data.seq_len must be >= 1 (windows of seq_len + 1 tokens), got 0"),
    ("data.val_fraction=1.0", "data.val_fraction must be in (0, 1), got 1.0"),
    ("data.val_fraction=nan", "data.val_fraction must be in (0, 1), got nan"),
    ("data.jsonl_field= ", "data.jsonl_field must be a non-empty string, got ''"),
    ("model.vocab_size=0", "model.vocab_size must be > 0, got 0"),
    ("model.n_heads=0", "model.n_heads must be > 0, got 0"),  # was a ZeroDivisionError
    ("model.norm_eps=0", "model.norm_eps must be > 0 and finite, got 0.0"),
    ("model.init_std=-0.02", "model.init_std must be > 0 and finite, got -0.02"),
    ("parallel.timeout_s=0", "parallel.timeout_s must be > 0 and finite, got 0.0"),
    ("parallel.timeout_s=-5", "parallel.timeout_s must be > 0 and finite, got -5.0"),
    ("parallel.timeout_s=nan", "parallel.timeout_s must be > 0 and finite, got nan"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[o for o, _ in BAD])
def test_every_bad_hyperparameter_fails_check_with_its_name_value_and_range(override, message, capsys):
    from launch.trainer.loop import main

    assert main(["--config", "configs/llama_tiny.toml", "--check", "--set", override]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_edge_values_that_are_allowed_pass_check(capsys):
    from launch.trainer.loop import main

    ok = ["optim.grad_clip=0", "optim.warmup_steps=0", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1",
          "optim.momentum=0", "optim.betas=[0.0, 0.999]", "optim.weight_decay=0", "optim.adamw_lr=1e-3",
          "train.keep_last=0", "train.seed=0", "data.seq_len=1", "parallel.timeout_s=1800"]
    args = ["--config", "configs/llama_tiny.toml", "--check"]
    for item in ok:
        args += ["--set", item]
    assert main(args) == 0
    assert capsys.readouterr().out == "configs/llama_tiny.toml: ok\n"


def test_the_module_command_exits_2_with_the_message():
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--check", "--set", "optim.lr=-1e-3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "error: optim.lr must be > 0 and finite, got -0.001"


# ---- grad_clip = 0: no clipping ------------------------------------------------------------------


def test_clip_grad_norm_zero_leaves_grads_and_returns_the_true_norm():
    from launch.trainer.parallel import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 10
    before = [p.grad.clone() for p in params]
    true = torch.cat([b.flatten() for b in before]).double().norm()
    assert true.item() > 10  # so that any max_norm of 1 would have scaled

    norm = clip_grad_norm(params, 0.0)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(true.item(), rel=1e-6)  # fp32 norms
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))  # bit for bit

    again = clip_grad_norm(params, 1.0)  # the usual clip still scales to norm 1
    assert again.item() == norm.item()
    scaled = torch.cat([p.grad.flatten() for p in params]).double().norm().item()
    assert scaled == pytest.approx(1.0 / (1 + 1e-6 / true.item()), rel=1e-6)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"max_norm must be >= 0 and finite \(0: no clipping\)"):
            clip_grad_norm(params, bad)


# ---- process-group timeout -----------------------------------------------------------------------


def test_parallel_timeout_reaches_init_process_group(monkeypatch):
    import launch.trainer.parallel as par

    calls = []
    monkeypatch.setattr(par.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(par.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(par.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(par.torch.cuda, "is_available", lambda: False)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)

    cfg = load_config("configs/llama_tiny.toml", ["parallel.timeout_s=123.5"])
    assert par.setup_distributed(cfg.parallel.timeout_s) == (0, 1, torch.device("cpu"))
    (args, kwargs), = calls
    assert args == ("gloo",) and kwargs["timeout"] == timedelta(seconds=123.5)
    assert kwargs["rank"] == 0 and kwargs["world_size"] == 1
    calls.clear()
    par.setup_distributed()  # no value: torch's own default, nothing passed
    assert "timeout" not in calls[0][1]
    assert load_config("configs/llama_tiny.toml").parallel.timeout_s == 600.0


# ---- a prepared folder ---------------------------------------------------------------------------


def make_folder(path: Path, shards=((3000, 400), (2500, 300)), *, record_max=True, vocab=VOCAB, seed=0) -> Path:
    """A prepared folder by hand (format 1, tokenizer 'bpe'): random ids below ``vocab``."""
    rng = np.random.default_rng(seed)
    (path / "shards").mkdir(parents=True)
    records = []
    for i, (train, val) in enumerate(shards):
        name = f"{i:06d}"
        top = -1
        for split, n in (("train", train), ("val", val)):
            ids = rng.integers(0, vocab, n).astype(np.uint16)
            ids.tofile(path / "shards" / f"{name}.{split}.bin")
            top = max(top, int(ids.max()) if n else -1)
        rec = {"shard": name, "source": "x", "part": 0, "role": "train", "train_tokens": train,
               "train_documents": 1, "val_tokens": val, "val_documents": 1}
        if record_max:
            rec["max_token_id"] = top
        records.append(rec)
    manifest = {"format": 1, "tokenizer": {"spec": "bpe", "file": "tokenizer.json", "sha256": "0" * 64,
                                           "vocab_size": vocab, "eot": 0},
                "dtype": "uint16", "source": {}, "val_every": 4, "train_tokens": sum(s[0] for s in shards),
                "val_tokens": sum(s[1] for s in shards), "train_documents": len(shards),
                "val_documents": len(shards), "shards": records}
    if record_max:
        manifest["max_token_id"] = max(r["max_token_id"] for r in records)
    write_manifest(path, manifest)
    return path


def write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    write_manifest(path, m)


def open_folder(path: Path, vocab: int = VOCAB, rank: int = 0):
    return open_dataset(DataConfig(prepared=str(path), seq_len=64), vocab,
                        TrainConfig(global_batch=8, eval_sequences=4), rank)


def test_a_good_folder_opens(tmp_path):
    ds = open_folder(make_folder(tmp_path / "p"))
    assert len(ds.sampler.tokens) == 5500 and ds.val_windows.shape == (4, 65)


def test_a_truncated_shard_is_refused_with_its_sizes(tmp_path):
    folder = make_folder(tmp_path / "p")
    path = folder / "shards" / "000001.train.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError) as e:
        open_folder(folder)
    assert str(e.value) == (f"data.prepared: shard 000001: {path} has 4,997 bytes, but the manifest records 2,500 "
                            f"train tokens x 2 bytes (uint16) = 5,000 bytes: the file is truncated; copy the "
                            f"complete folder again or re-run python -m launch.prepare")


def test_a_shard_longer_than_recorded_is_refused(tmp_path):
    folder = make_folder(tmp_path / "p")
    path = folder / "shards" / "000000.val.bin"
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(DataError, match=r"has 802 bytes, but the manifest records 400 val tokens x 2 bytes "
                                        r"\(uint16\) = 800 bytes: the file is longer than recorded"):
        open_folder(folder)


def test_a_missing_shard_is_refused(tmp_path):
    folder = make_folder(tmp_path / "p")
    path = folder / "shards" / "000001.val.bin"
    path.unlink()
    with pytest.raises(DataError) as e:
        open_folder(folder)
    assert str(e.value) == (f"data.prepared: shard 000001: {path} is missing (the manifest records 300 val tokens); "
                            f"copy the complete folder again or re-run python -m launch.prepare")


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "sub/000000", "..", "", None, 7])
def test_a_shard_name_outside_the_folder_is_refused_not_followed(tmp_path, name):
    folder = make_folder(tmp_path / "p")
    (tmp_path / "outside.train.bin").write_bytes(np.zeros(3000, np.uint16).tobytes())  # would fit, if followed
    (tmp_path / "outside.val.bin").write_bytes(np.zeros(400, np.uint16).tobytes())
    edit_manifest(folder, lambda m: m["shards"][0].update(shard=name))
    with pytest.raises(DataError) as e:
        open_folder(folder)
    assert str(e.value) == (f"data.prepared: {folder / 'manifest.json'}: shard entry 0 is named {name!r}, not a plain "
                            f"file name inside {folder / 'shards'}: refused (a prepared folder never names files "
                            f"elsewhere)")


def test_a_shard_listed_twice_is_refused(tmp_path):
    folder = make_folder(tmp_path / "p", shards=((3000, 400), (3000, 400)))
    edit_manifest(folder, lambda m: m["shards"][1].update(shard="000000"))
    with pytest.raises(DataError, match="manifest.json: shard 000000 is listed twice$"):
        open_folder(folder)


def test_a_damaged_manifest_is_refused(tmp_path):
    folder = make_folder(tmp_path / "p")
    (folder / "manifest.json").write_text('{"format": 1, "shards": [')
    with pytest.raises(DataError, match=r"manifest.json is not valid JSON \(.*\): the folder is damaged"):
        open_folder(folder)
    edit = make_folder(tmp_path / "q")
    edit_manifest(edit, lambda m: m.update(format=2))
    with pytest.raises(DataError, match=r"manifest.json has format 2; this trainer reads format 1$"):
        open_folder(edit)


def test_recorded_token_ids_beyond_the_vocabulary_are_refused_without_reading(tmp_path):
    """The folder's tokenizer claims 4096 ids, but shard 000001 recorded id 5000 (a sparse
    tokenizer.json, say): refused from the manifest alone."""
    folder = make_folder(tmp_path / "p")
    edit_manifest(folder, lambda m: (m["shards"][1].update(max_token_id=5000), m.update(max_token_id=5000)))
    with pytest.raises(DataError) as e:
        open_folder(folder)
    assert str(e.value) == ("data.prepared: shard 000001 holds token id 5000 (its recorded max_token_id) but "
                            "model.vocab_size is 4096: ids must be < vocab_size; set model.vocab_size >= 5001 or "
                            "prepare the data with a tokenizer of at most 4096 ids")


@pytest.mark.parametrize("split,shard,offset", [("train", 1, 2499), ("val", 0, 0), ("train", 0, 1234)])
def test_an_older_folder_without_max_token_id_is_sampled(tmp_path, split, shard, offset):
    """No max_token_id (written before it was recorded): small splits are read whole; the
    error names the shard, the split, the offset and what was sampled."""
    folder = make_folder(tmp_path / "p", record_max=False)
    ids = np.zeros(1, np.uint16) + 4096
    with open(folder / "shards" / f"{shard:06d}.{split}.bin", "r+b") as f:
        f.seek(offset * 2)
        f.write(ids.tobytes())
    total = {"train": 5500, "val": 700}[split]
    before = (3000 if split == "train" else 400) if shard == 1 else 0
    sampled = min(total, (before + offset) // 256 * 256 + 256)
    with pytest.raises(DataError) as e:
        open_folder(folder)
    assert str(e.value) == (f"data.prepared: shard {shard:06d} holds token id 4096 at {split} token {offset:,} but "
                            f"model.vocab_size is 4096: ids must be < vocab_size; set model.vocab_size >= 4097 or "
                            f"prepare the data with a tokenizer of at most 4096 ids (the folder records no "
                            f"max_token_id, so {sampled:,} of its {total:,} {split} tokens were sampled)")


def test_a_large_older_folder_samples_evenly_spaced_blocks(tmp_path, monkeypatch):
    """Above SAMPLE_BLOCKS x SAMPLE_BLOCK tokens, blocks at evenly spaced offsets, the first and
    the last included: a bad id in the last block is found; one between blocks is not read."""
    import launch.data.loader as data

    monkeypatch.setattr(data, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(data, "SAMPLE_BLOCK", 100)  # blocks at 0, 1766, 3533, 5300 of 5400 train tokens
    folder = make_folder(tmp_path / "p", shards=((3000, 400), (2400, 300)), record_max=False)
    path = folder / "shards" / "000000.train.bin"
    ids = np.fromfile(path, np.uint16)
    ids[1000] = 9999  # between two blocks: not sampled
    ids.tofile(path)
    open_folder(folder)
    path = folder / "shards" / "000001.train.bin"
    ids = np.fromfile(path, np.uint16)
    ids[-1] = 9999  # the very last token: in the last block
    ids.tofile(path)
    with pytest.raises(DataError, match=r"shard 000001 holds token id 9999 at train token 2,399 .* so 400 of its "
                                        r"5,400 train tokens were sampled\)$"):
        open_folder(folder)


def test_prepare_records_the_largest_token_id_and_a_sparse_tokenizer_is_refused(tmp_path):
    """A word-level tokenizer.json with ids 0, 1 and 9000 reports 3 tokens: its folder passes the
    vocabulary check of the tokenizer, but the recorded max_token_id (9000) stops the run."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from launch.data.prepare import prepare

    tok = Tokenizer(models.WordLevel({"</s>": 0, "<unk>": 1, "big": 9000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("a big " * 200)
    (tmp_path / "v.txt").write_text("a " * 100)
    out = prepare(str(tmp_path / "a.txt"), str(tmp_path / "tokenizer.json"), tmp_path / "p",
                  val_data=str(tmp_path / "v.txt"), quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["max_token_id"] == 9000 and [s["max_token_id"] for s in m["shards"]] == [9000, 1]
    cfg = DataConfig(prepared=str(out), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=16)
    with pytest.raises(DataError, match=r"^data.prepared: shard 000000 holds token id 9000 \(its recorded "
                                        r"max_token_id\) but model.vocab_size is 4096"):
        open_dataset(cfg, 4096, TrainConfig(global_batch=2, eval_sequences=1))
    ds = open_dataset(cfg, 9001, TrainConfig(global_batch=2, eval_sequences=1))
    assert int(ds.sampler.tokens[0:len(ds.sampler.tokens)].max()) == 9000
    # the same tokenizer inside the job: refused after tokenizing, no cache entry left
    in_job = DataConfig(source=str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "tokenizer.json"),
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        prepare_in_job(in_job, 4096)
    assert str(e.value) == (f"data.tokenizer '{tmp_path}/tokenizer.json' produced token id 9000 but model.vocab_size "
                            f"is 4096: ids must be < vocab_size; set model.vocab_size >= 9001")
    assert not list((tmp_path / "cache").rglob("tokens.*"))


# ---- text inputs: not UTF-8, empty ---------------------------------------------------------------


def word_tokenizer(path: Path) -> str:
    """A word-level tokenizer.json (no training: the tests stay fast and exact)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "<unk>", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_undecodable_bytes_are_counted_exactly_and_warned(tmp_path):
    """Two bad bytes (one U+FFFD each) and one genuine U+FFFD in the text: 2 replacements."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("hello world " * 100).encode() + b"\xff hello \xc3 " + "\ufffd".encode())
    good = tmp_path / "good.txt"
    good.write_text("hello world " * 100)
    cfg = DataConfig(source=f"{bad},{good}", tokenizer=word_tokenizer(tmp_path / "t.json"),
                     cache_dir=str(tmp_path / "cache"))
    with pytest.warns(InputWarning) as caught:
        prepare_in_job(cfg, VOCAB)
    assert [str(w.message) for w in caught if w.category is InputWarning] == [
        f"2 undecodable byte sequence(s) replaced by U+FFFD in 1 .txt file(s) (not valid UTF-8 there): {bad} (2)"]


def test_a_txt_file_that_is_mostly_not_utf8_is_refused(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("hello caf\u00e9 na\u00efve ".encode("latin-1") * 50)  # 2 bad bytes in 17 characters
    cfg = DataConfig(source=str(bad), tokenizer=word_tokenizer(tmp_path / "t.json"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as e:
        prepare_in_job(cfg, VOCAB)
    assert str(e.value) == (f"data.source {str(bad)!r}: {bad}: 100 of its 850 characters are not valid UTF-8 (more "
                            f"than 1%): is it another encoding? convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) "
                            f"or leave it out")


def test_empty_files_are_warned_with_a_count_and_all_empty_is_refused(tmp_path):
    tok = word_tokenizer(tmp_path / "t.json")
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("  \n\n ")
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n{"text": "hello"}\n')
    cfg = DataConfig(source=f"{tmp_path}/*.txt,{tmp_path}/d.jsonl", tokenizer=tok, cache_dir=str(tmp_path / "c1"))
    with pytest.warns(InputWarning) as caught:
        prepare_in_job(cfg, VOCAB)
    assert [str(w.message) for w in caught if w.category is InputWarning] == [
        f"2 of 4 input files are empty (no document with text): {tmp_path}/b.txt, {tmp_path}/c.txt",
        "1 of the 3 documents of the files with text are empty (each adds only an end-of-text token)"]

    cfg = DataConfig(source=f"{tmp_path}/b.txt,{tmp_path}/c.txt", tokenizer=tok, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(DataError) as e:
        prepare_in_job(cfg, VOCAB)
    assert str(e.value) == (f"data.source {cfg.source!r}: every input is empty: 2 file(s) without a non-empty "
                            f"document ({tmp_path}/b.txt, {tmp_path}/c.txt); nothing to train on")
    assert not list((tmp_path / "c2").rglob("tokens.*"))  # no cache entry, not even a temporary one


def test_launch_prepare_warns_and_refuses_the_same(tmp_path, capsys):
    from launch.data.prepare import main

    tok = word_tokenizer(tmp_path / "t.json")
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "v.txt").write_text("hello")
    assert main(["--data", f"{tmp_path}/a.txt,{tmp_path}/b.txt", "--val-data", f"{tmp_path}/v.txt",
                 "--tokenizer", tok, "--out", str(tmp_path / "p"), "--quiet", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert err == f"warning: 1 of 3 input files are empty (no document with text): {tmp_path}/b.txt\n"
    assert main(["--data", f"{tmp_path}/b.txt", "--val-data", f"{tmp_path}/b.txt", "--tokenizer", tok,
                 "--out", str(tmp_path / "q"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: every input is empty: 1 file(s) without a non-empty document "
                                       f"({tmp_path}/b.txt); nothing to train on\n")
    assert not (tmp_path / "q").exists()


def test_check_inputs_counts():
    assert check_inputs({"a": Counter(documents=3), "b": Counter(documents=2, replaced_chars=0)}, warn=False) == []
    notes = check_inputs({"a": Counter(documents=3, empty_documents=1, replaced_chars=4), "b": Counter()}, warn=False)
    assert notes == ["1 of 2 input files are empty (no document with text): b",
                     "1 of the 3 documents of the files with text are empty (each adds only an end-of-text token)",
                     "4 undecodable byte sequence(s) replaced by U+FFFD in 1 .txt file(s) (not valid UTF-8 "
                     "there): a (4)"]
    many = {f"f{i}": Counter() for i in range(7)}
    with pytest.raises(SourceError, match=r"^every input is empty: 7 file\(s\) without a non-empty document "
                                          r"\(f0, f1, f2, f3, f4 and 2 more\); nothing to train on$"):
        check_inputs(many)


# ---- two ranks -----------------------------------------------------------------------------------


def _two_rank_cases(rank, world_size, root):
    """Each case on both ranks: (message of the DataError or None, seconds it took)."""
    import launch.data.loader as data

    root = Path(root)
    train = TrainConfig(global_batch=8, eval_sequences=4)
    out = {}

    def attempt(name, cfg, vocab=VOCAB):
        t0 = time.monotonic()
        try:
            open_dataset(cfg, vocab, train, rank)
            out[name] = (None, time.monotonic() - t0)
        except DataError as e:
            out[name] = (str(e), time.monotonic() - t0)

    attempt("truncated", DataConfig(prepared=str(root / "truncated"), seq_len=64))
    # rank 1 sees a copy of the folder without one shard (a node that was not synced)
    attempt("one_node", DataConfig(prepared=str(root / ("good" if rank == 0 else "missing")), seq_len=64))
    tok = str(root / "t.json")
    attempt("rank0_empty", DataConfig(source=f"{root}/empty*.txt", tokenizer=tok, cache_dir=str(root / "c1")))

    def boom(cfg, vocab_size):
        raise RuntimeError("disk quota exceeded while tokenizing")

    data.cache_tokens = boom  # rank 0 alone runs it: the others must not wait in the barrier for it
    attempt("rank0_crash", DataConfig(source=f"{root}/a.txt", tokenizer=tok, cache_dir=str(root / "c2")))
    attempt("good", DataConfig(prepared=str(root / "good"), seq_len=64))  # the group still works
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_raise_the_same_error_at_once(tmp_path):
    from dist import run_distributed

    make_folder(tmp_path / "good")
    truncated = make_folder(tmp_path / "truncated")
    path = truncated / "shards" / "000000.train.bin"
    path.write_bytes(path.read_bytes()[:100])
    missing = make_folder(tmp_path / "missing")
    (missing / "shards" / "000001.train.bin").unlink()
    word_tokenizer(tmp_path / "t.json")
    (tmp_path / "empty1.txt").write_text("")
    (tmp_path / "empty2.txt").write_text("\n")
    (tmp_path / "a.txt").write_text("hello world " * 200)

    t0 = time.monotonic()
    ranks = run_distributed(_two_rank_cases, 2, tmp_path, str(tmp_path), timeout=240)
    assert time.monotonic() - t0 < 60  # the process group's timeout (60 s) was never waited for
    r0, r1 = ranks
    assert r0.keys() == r1.keys() == {"truncated", "one_node", "rank0_empty", "rank0_crash", "good"}
    for case in r0:
        assert r0[case][0] == r1[case][0], case  # the same message on both ranks
        assert r0[case][1] < 20 and r1[case][1] < 20, (case, r0[case][1], r1[case][1])
    assert r0["truncated"][0] == (f"data.prepared: shard 000000: {path} has 100 bytes, but the manifest records "
                                  f"3,000 train tokens x 2 bytes (uint16) = 6,000 bytes: the file is truncated; copy "
                                  f"the complete folder again or re-run python -m launch.prepare")
    assert r0["one_node"][0] == (f"data.prepared: shard 000001: {missing}/shards/000001.train.bin is missing (the "
                                 f"manifest records 2,500 train tokens); copy the complete folder again or re-run "
                                 f"python -m launch.prepare [raised on rank(s) 1 of 2]")
    assert r0["rank0_empty"][0] == (f"data.source '{tmp_path}/empty*.txt': every input is empty: 2 file(s) without "
                                    f"a non-empty document ({tmp_path}/empty1.txt, {tmp_path}/empty2.txt); nothing "
                                    f"to train on [raised on rank(s) 0 of 2]")
    assert r0["rank0_crash"][0] == ("RuntimeError: disk quota exceeded while tokenizing "
                                    "[raised on rank(s) 0 of 2]")
    assert r0["good"][0] is None


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_torchrun_trainer_on_a_truncated_folder_exits_on_every_rank(tmp_path):
    """The real trainer, 2 ranks: rank 0 prints the error once, both exit 2 before any step."""
    from test_recipe import torchrun

    folder = make_folder(tmp_path / "p", shards=((3000, 400), (2500, 300)))
    path = folder / "shards" / "000001.val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    proc = torchrun(tmp_path / "run", "--resume", "none", "--data-dir", str(folder))
    try:
        output = proc.communicate(timeout=200)[0]
    except subprocess.TimeoutExpired:  # a hang: kill the whole torchrun session, then fail
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0, output
    message = (f"error: data.prepared: shard 000001: {path} has 598 bytes, but the manifest records 300 val tokens "
               f"x 2 bytes (uint16) = 600 bytes: the file is truncated")
    assert output.count(message) == 1, output
    # torchrun's failure report: both ranks left with the trainer's own exit code 2 (a rank that
    # hung would be killed by torchrun after the other's exit and show a signal, -15)
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", output))
    assert exits == {"0": "2", "1": "2"}, output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
