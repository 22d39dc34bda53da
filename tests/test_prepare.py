"""``python -m launch.prepare``: the same folder, byte for byte, from 1 or 3 workers and after a
SIGKILL mid-way; every input format gives exactly the tokens the tokenizer gives; the held-out
documents are those the rule names; a folder that does not fit the model is refused."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.config import DataConfig, TrainConfig
from launch.data.loader import DataError, cache_tokens as prepare_in_job, open_dataset
from launch.data.prepare import PrepareError, is_validation, prepare
from launch.data.sources import SourceError, iter_unit, plan_units, source_files
from launch.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the people of united states in order to form more perfect union establish justice insure "
         "domestic tranquility provide for common defence promote general welfare liberty").split()


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) + ("\n" if i % 7 == 0 else "")
            for i in range(n)]


def write_corpus(folder: Path) -> str:
    """The four formats: a JSONL cut into several units, a JSONL.gz, two texts, a 3-row-group parquet."""
    folder.mkdir()
    with open(folder / "a.jsonl", "w") as f:
        for d in documents(400, 1):
            f.write(json.dumps({"text": d, "id": 0}) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        for d in documents(50, 2):
            f.write(json.dumps({"text": d}) + "\n")
    for i, d in enumerate(documents(2, 3)):
        (folder / f"c{i}.txt").write_text(d)
    pq.write_table(pa.table({"text": documents(90, 4)}), folder / "d.parquet", row_group_size=30)
    return f"{folder}/*.jsonl,{folder}/*.jsonl.gz,{folder}/*.txt,{folder}/*.parquet"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


OPTIONS = dict(tokenizer="bpe", vocab_size=400, val_every=5, chunk_bytes=8 << 10, quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = write_corpus(root / "src")
    one = prepare(data, out=root / "one", workers=1, **OPTIONS)
    return data, one


def test_one_and_three_workers_write_identical_folders(corpus, tmp_path):
    data, one = corpus
    units = plan_units(source_files(data), OPTIONS["chunk_bytes"])
    assert len(units) >= 8 and len({u.fmt for u in units}) == 4  # several units of every format
    three = prepare(data, out=tmp_path / "three", workers=3, **OPTIONS)
    a, b = folder_bytes(one), folder_bytes(three)
    assert a.keys() == b.keys() and len(a) == 2 + 5 * len(units)
    for name in a:
        assert a[name] == b[name], name
    assert not (tmp_path / "three.partial").exists()


def test_killed_preparation_resumes_to_the_identical_folder(corpus, tmp_path):
    """The preparation SIGKILLs itself while finishing its third shard (a test-edge wrapper around
    the shard's done marker); the re-run keeps the two shards marked done and ends identical."""
    data, one = corpus
    out = tmp_path / "cut"
    crash = (
        "import os, signal, sys, launch.data.prepare as p\n"
        "calls = []\n"
        "real = p._finish_shard\n"
        "def finish(base, record):\n"
        "    calls.append(base)\n"
        "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(base, record)\n"
        "p._finish_shard = finish\n"
        "sys.exit(p.main(sys.argv[1:]))\n")
    args = ["--data", data, "--tokenizer", "bpe", "--vocab-size", "400", "--val-every", "5",
            "--chunk-mb", str(8 / 1024), "--workers", "1", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", crash, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "cut.partial"
    assert not out.exists() and len(list((partial / "shards").glob("*.json"))) == 2
    assert list((partial / "shards").glob("000002.*.bin"))  # the third shard's data, without its marker
    with pytest.raises(DataError, match="did not finish; re-run it to resume"):
        open_dataset(DataConfig(prepared=str(out)), 400, TrainConfig())
    resumed = subprocess.run([sys.executable, "-m", "launch.prepare", *args], env=env, capture_output=True,
                             text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert folder_bytes(out) == folder_bytes(one)
    assert not partial.exists()


def test_every_format_gives_the_tokenizers_own_tokens(tmp_path):
    """All of --data trains (a separate --val-data): each shard is the tokenizer's ids of its
    documents, each followed by end-of-text, and ``.ends`` marks every document."""
    data = write_corpus(tmp_path / "src")
    (tmp_path / "val.txt").write_text("held out")
    out = prepare(data, "llama32k", tmp_path / "p", val_data=str(tmp_path / "val.txt"), chunk_bytes=8 << 10,
                  workers=1, quiet=True)
    sp = load_tokenizer("llama32k")
    manifest = json.loads((out / "manifest.json").read_text())
    units = plan_units(source_files(data), 8 << 10)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 32000
    assert [s["source"] for s in manifest["shards"][:-1]] == [u.path for u in units]
    formats = set()
    for shard, unit in zip(manifest["shards"], units):
        docs = list(iter_unit(unit))
        expected = [ids + [sp.eot] for ids in sp.sp.encode(docs)]
        tokens = np.fromfile(out / "shards" / f"{shard['shard']}.train.bin", dtype=np.uint16)
        ends = np.fromfile(out / "shards" / f"{shard['shard']}.train.ends", dtype=np.uint64)
        assert tokens.tolist() == [t for ids in expected for t in ids], unit
        assert ends.tolist() == np.cumsum([len(e) for e in expected]).tolist()
        assert shard["val_tokens"] == 0
        formats.add(unit.fmt)
    assert formats == {".txt", ".jsonl", ".jsonl.gz", ".parquet"}
    # and the documents are the files' own: the JSONL units together hold every line once
    jsonl = [d for u in units if u.fmt == ".jsonl" for d in iter_unit(u)]
    assert jsonl == documents(400, 1)
    val = np.fromfile(out / "shards" / f"{manifest['shards'][-1]['shard']}.val.bin", dtype=np.uint16)
    assert val.tolist() == sp.sp.encode("held out") + [sp.eot]


def test_held_out_documents_are_the_ones_the_rule_names(corpus):
    data, one = corpus
    manifest = json.loads((one / "manifest.json").read_text())
    units = plan_units(source_files(data), OPTIONS["chunk_bytes"])
    picked = [[is_validation(u, i, 5) for i in range(len(list(iter_unit(unit))))]
              for u, unit in enumerate(units)]
    for shard, flags in zip(manifest["shards"], picked):
        assert (shard["val_documents"], shard["train_documents"]) == (sum(flags), len(flags) - sum(flags))
    total = manifest["val_documents"] + manifest["train_documents"]
    assert 0.1 < manifest["val_documents"] / total < 0.3  # about 1 in 5


def test_a_tokenizer_json_is_used_as_is(corpus, tmp_path):
    """A user's Hugging Face tokenizer.json (here the BPE the corpus folder carries)."""
    data, one = corpus
    out = prepare(data, str(one / "tokenizer.json"), tmp_path / "hf", val_every=5, chunk_bytes=8 << 10,
                  workers=1, quiet=True)
    a, b = folder_bytes(one), folder_bytes(out)
    assert {k: v for k, v in a.items() if k.startswith("shards/") and not k.endswith(".json")} == \
           {k: v for k, v in b.items() if k.startswith("shards/") and not k.endswith(".json")}


def test_refusals(corpus, tmp_path):
    data, one = corpus
    with pytest.raises(PrepareError, match="holds a different preparation"):
        prepare(data, out=one, workers=1, **{**OPTIONS, "val_every": 7})
    assert prepare(data, out=one, workers=1, **OPTIONS) == one  # the same command: already done
    train = TrainConfig(global_batch=4)
    cfg = DataConfig(prepared=str(one), seq_len=16)
    ds = open_dataset(cfg, 400, train)
    assert len(ds.sampler.tokens) == json.loads((one / "manifest.json").read_text())["train_tokens"]
    with pytest.raises(DataError, match="tokenized with 'bpe'.*data.tokenizer is 'llama32k'"):
        open_dataset(DataConfig(prepared=str(one), seq_len=16, tokenizer="llama32k"), 32000, train)
    vocab = json.loads((one / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    with pytest.raises(DataError, match=f"model.vocab_size >= {vocab}"):
        open_dataset(cfg, vocab - 1, train)
    with pytest.raises(DataError, match="is not a prepared folder"):
        open_dataset(DataConfig(prepared=str(tmp_path / "none")), 400, train)


def test_a_large_source_is_refused_inside_torchrun(tmp_path, monkeypatch):
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * 2000}) + "\n")
    monkeypatch.setattr("launch.data.loader.INLINE_LIMIT_BYTES", 1000)
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = DataConfig(source=str(big), tokenizer="llama32k", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"python -m launch.prepare --data '.*big.jsonl' --tokenizer llama32k"):
        prepare_in_job(cfg, 32000)
    monkeypatch.delenv("LOCAL_RANK")  # a plain single process may tokenize it
    assert prepare_in_job(cfg, 32000).is_file()


def test_a_bad_record_stops_with_its_place_and_keeps_finished_shards(corpus, tmp_path):
    data, one = corpus
    bad = tmp_path / "z.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(SourceError, match=r"z.jsonl \(byte 17\): no 'text' text field"):
        prepare(f"{data},{bad}", str(one / "tokenizer.json"), tmp_path / "p", workers=2, val_every=5,
                chunk_bytes=8 << 10, quiet=True)  # a worker meets it (a BPE trained here would first)
    partial = tmp_path / "p.partial"
    assert not (tmp_path / "p").exists() and (partial / "tokenizer.json").is_file()


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    """A user's tokenizer.json with 70,000 entries (a word-level model): ids above 65535 survive."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["</s>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("w0 w69999 w65535 w12")
    (tmp_path / "val.txt").write_text("w1")
    out = prepare(str(tmp_path / "doc.txt"), str(tmp_path / "tokenizer.json"), tmp_path / "p",
                  val_data=str(tmp_path / "val.txt"), quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["eot"] == 0
    ds = open_dataset(DataConfig(prepared=str(out), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=1),
                      70_002, TrainConfig(global_batch=2, eval_sequences=1))
    assert ds.sampler.tokens[0:5].tolist() == [2, 70_001, 65_537, 14, 0]
    assert ds.val_windows.tolist() == [[3, 0]]
