"""Tokenize a corpus once, before and outside training, into a folder any number of nodes can map.

    python -m launch.prepare --data 'a/*.jsonl,b/*.parquet' --tokenizer llama32k --out DIR --workers N

- Parallel over units (``launch.data.sources``: files, 32 MB ranges of ``.jsonl``, parquet row
  groups), each unit becoming one shard; a worker holds one batch of documents at a time.
  The output depends only on the inputs and options, never on ``--workers`` (bit for bit).
- Output: ``shards/NNNNNN.{train,val}.bin`` (uint16 tokens, uint32 above 65536 ids), with
  ``.ends`` files (uint64 end offset of every document), the tokenizer itself, and
  ``manifest.json`` (tokenizer, vocabulary size, source fingerprint, token and document counts).
- Validation by document: a document is held out when a hash of its position (unit, index in
  unit) falls in 1 of ``--val-every`` buckets, so the split is fixed by the data alone; or all of
  ``--val-data`` and none of ``--data``.
- Crash safety, as for checkpoints: work happens in ``DIR.partial``; each shard's files are
  renamed into place and then marked done by a renamed ``NNNNNN.json``; the folder is renamed to
  ``DIR`` only once every shard and the manifest are written. Re-running the same command
  resumes from the shards marked done; ``DIR`` itself is never half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .format import FORMAT_VERSION, PrepareError, token_dtype
from .sampler import mix64
from .sources import InputWarning, SourceError, Unit, check_inputs, iter_documents, iter_unit, plan_units, source_files
from .tokenizer import TokenizerError, load_saved, load_tokenizer, sha256_file, tokenizer_file, train_bpe

ENCODE_BATCH = 256  # documents per encode call: bounds a worker's memory


def is_validation(unit_index: int, doc_index: int, val_every: int) -> bool:
    """The held-out rule: about 1 document in ``val_every``, chosen by a hash of its position."""
    return val_every > 0 and mix64((unit_index << 40) ^ doc_index) % val_every == 0


def fingerprint(units: list[Unit], options: dict) -> str:
    """Files (path, size, mtime), their cut into units, and every option that changes the output."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for u in units:
        st = os.stat(u.path)
        h.update(json.dumps([u.to_dict(), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:32]


def shard_name(index: int) -> str:
    return f"{index:06d}"


def _write_array(path: Path, values: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    values.tofile(tmp)
    os.replace(tmp, path)


def tokenize_unit(folder: Path, index: int, unit: Unit, role: str, field: str, val_every: int, tokenizer) -> dict:
    """Write shard ``index`` of ``folder`` from ``unit``; returns its record (also its done marker)."""
    dtype = token_dtype(tokenizer.vocab_size)
    shards = folder / "shards"
    base = shards / shard_name(index)
    outs = {split: open(f"{base}.{split}.bin.tmp", "wb") for split in ("train", "val")}
    ends = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    stats = Counter()
    doc_index, max_id = 0, -1

    def flush(docs: list[str]) -> None:
        nonlocal doc_index, max_id
        for ids in tokenizer.encode_batch(docs, threads=1):  # the workers are the parallelism
            split = "val" if role == "val" or is_validation(index, doc_index, val_every) else "train"
            doc = np.asarray(ids + [tokenizer.eot], dtype=dtype)
            doc.tofile(outs[split])
            max_id = max(max_id, int(doc.max()))
            counts[split] += len(doc)
            ends[split].append(counts[split])
            doc_index += 1

    batch: list[str] = []
    for doc in iter_unit(unit, field, stats):
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            flush(batch)
            batch = []
    flush(batch)
    for split, f in outs.items():
        f.close()
        os.replace(f"{base}.{split}.bin.tmp", f"{base}.{split}.bin")
        _write_array(Path(f"{base}.{split}.ends"), np.asarray(ends[split], dtype=np.uint64))
    record = {"shard": shard_name(index), "source": unit.path, "part": unit.begin, "role": role,
              "train_tokens": counts["train"], "train_documents": len(ends["train"]),
              "val_tokens": counts["val"], "val_documents": len(ends["val"]),
              "max_token_id": max_id, "empty_documents": stats["empty_documents"],
              "replaced_chars": stats["replaced_chars"]}
    _finish_shard(base, record)
    return record


def _finish_shard(base: Path, record: dict) -> None:
    """The done marker, written last and renamed: a shard without it is redone on resume."""
    tmp = Path(f"{base}.json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, f"{base}.json")


_worker_tokenizer = None


def _worker_init(folder: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _worker_tokenizer = load_saved(Path(folder))


def _worker_run(folder: str, index: int, unit: Unit, role: str, field: str, val_every: int) -> dict:
    return tokenize_unit(Path(folder), index, unit, role, field, val_every, _worker_tokenizer)


def _progress(total_bytes: int, done_bytes: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="tokenizing", disable=quiet, dynamic_ncols=True, smoothing=0.1)


def prepare(data: str, tokenizer: str, out: str | Path, *, workers: int = 1, field: str = "text",
            val_every: int = 100, val_data: str = "", vocab_size: int = 4096, chunk_bytes: int = 32 << 20,
            quiet: bool = False) -> Path:
    """Tokenize ``data`` into the prepared folder ``out`` (see the module docstring); returns it."""
    out = Path(out)
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    if val_data and val_every:
        val_every = 0  # a separate validation source: all of --data trains
    if not val_data and val_every < 2:
        raise PrepareError("pass --val-every K (K >= 2: about 1 document in K is held out) or --val-data FILES")
    files = source_files(data) + (source_files(val_data) if val_data else [])
    jobs = [(u, "train") for u in plan_units(source_files(data), chunk_bytes)]
    if val_data:
        jobs += [(u, "val") for u in plan_units(source_files(val_data), chunk_bytes)]
    options = {"format": FORMAT_VERSION, "tokenizer": tokenizer, "field": field, "val_every": val_every,
               "chunk_bytes": chunk_bytes, "roles": [r for _, r in jobs]}
    if tokenizer == "bpe":
        options["bpe_vocab_size"] = vocab_size
    else:
        options["tokenizer_sha256"] = sha256_file(tokenizer_file(tokenizer))
    key = fingerprint([u for u, _ in jobs], options)

    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["source"]["fingerprint"] != key:
            raise PrepareError(f"{out} holds a different preparation (other files, tokenizer or options): "
                               f"choose another --out or remove it")
        return out
    if out.exists():
        raise PrepareError(f"{out} exists and is not a prepared folder: choose another --out")
    work = out.with_name(out.name + ".partial")
    plan_file = work / "plan.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text())["fingerprint"] != key):
        shutil.rmtree(work)  # left by a preparation of something else: start over
    (work / "shards").mkdir(parents=True, exist_ok=True)

    tok = _saved_tokenizer(work, tokenizer, data, field, vocab_size)
    plan_file.write_text(json.dumps({"fingerprint": key, "options": options}))
    done = {i: json.loads((work / "shards" / f"{shard_name(i)}.json").read_text())
            for i in range(len(jobs)) if (work / "shards" / f"{shard_name(i)}.json").is_file()}
    todo = [i for i in range(len(jobs)) if i not in done]
    bar = _progress(sum(u.size for u, _ in jobs), sum(jobs[i][0].size for i in done), quiet)
    tokens, t0 = 0, time.perf_counter()

    def record(i: int, rec: dict) -> None:
        nonlocal tokens
        done[i] = rec
        tokens += rec["train_tokens"] + rec["val_tokens"]
        bar.update(jobs[i][0].size)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tok/s")

    if workers == 1 or len(todo) <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as one worker of a pool
        for i in todo:
            record(i, tokenize_unit(work, i, jobs[i][0], jobs[i][1], field, val_every, tok))
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(str(work),))
        try:
            futures = {pool.submit(_worker_run, str(work), i, jobs[i][0], jobs[i][1], field, val_every): i
                       for i in todo}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
        finally:  # on a bad record: stop at once, keeping the shards already marked done
            pool.shutdown(cancel_futures=True)
    bar.close()

    shards = [done[i] for i in range(len(jobs))]
    check_inputs(input_counts(files, shards))  # every input empty: refused; else warnings with counts
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": {"spec": tokenizer, "file": tok.file_name, "sha256": sha256_file(work / tok.file_name),
                      "vocab_size": tok.vocab_size, "eot": tok.eot},
        "dtype": token_dtype(tok.vocab_size).name,
        "source": {"data": data, "val_data": val_data, "field": field, "fingerprint": key,
                   "files": sorted({u.path for u, _ in jobs})},
        "val_every": val_every,
        "train_tokens": sum(s["train_tokens"] for s in shards),
        "val_tokens": sum(s["val_tokens"] for s in shards),
        "train_documents": sum(s["train_documents"] for s in shards),
        "val_documents": sum(s["val_documents"] for s in shards),
        # the largest id in any shard: the trainer checks it against model.vocab_size without
        # reading the tokens (absent in folders written before it was recorded: they are sampled)
        "max_token_id": max((s.get("max_token_id", -1) for s in shards), default=-1),
        "shards": shards,
    }
    tmp = work / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, work / "manifest.json")
    (work / "plan.json").unlink()
    os.replace(work, out)  # last: DIR exists only once complete
    return out


def input_counts(files: list[Path], shards: list[dict]) -> dict[str, Counter]:
    """Per input file, the shard records' document counts, for ``sources.check_inputs``
    (records from before these counts existed count as no empty documents)."""
    per_file = {str(f.resolve()): Counter() for f in files}
    for s in shards:
        c = per_file.setdefault(s["source"], Counter())
        c["documents"] += s["train_documents"] + s["val_documents"]
        c["empty_documents"] += s.get("empty_documents", 0)
        c["replaced_chars"] += s.get("replaced_chars", 0)
    return per_file


def _saved_tokenizer(work: Path, spec: str, data: str, field: str, vocab_size: int):
    """The tokenizer, saved into the folder first (a BPE is trained once, then reused on resume)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (work / name).is_file():
            return load_saved(work)
    if spec == "bpe":
        tok = train_bpe(iter_documents(source_files(data), field), vocab_size)
    else:
        tok = load_tokenizer(spec)
    tmp = work / "tokenizer.tmp"
    tmp.mkdir(exist_ok=True)
    saved = tok.save(tmp)
    os.replace(saved, work / saved.name)
    tmp.rmdir()
    return load_saved(work)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="comma-separated files/globs: .txt, .jsonl, .jsonl.gz, .parquet")
    ap.add_argument("--tokenizer", default="llama32k", help="llama32k, bpe, or a .model / tokenizer.json path")
    ap.add_argument("--out", required=True, help="the prepared folder (written as OUT.partial, renamed when complete)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--field", default="text", help="JSONL field / parquet column holding the text")
    ap.add_argument("--val-every", type=int, default=100, help="hold out about 1 document in K (default 100)")
    ap.add_argument("--val-data", default="", help="a separate validation source (then --data is all training)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of --tokenizer bpe")
    ap.add_argument("--chunk-mb", type=float, default=32, help="JSONL files are cut into ranges of this size")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    error = None
    with warnings.catch_warnings(record=True) as caught:  # printed as plain "warning:" lines
        warnings.simplefilter("always", InputWarning)
        try:
            out = prepare(args.data, args.tokenizer, args.out, workers=args.workers, field=args.field,
                          val_every=args.val_every, val_data=args.val_data, vocab_size=args.vocab_size,
                          chunk_bytes=int(args.chunk_mb * 2**20), quiet=args.quiet)
        except (PrepareError, SourceError, TokenizerError) as e:
            error = e
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    m = json.loads((out / "manifest.json").read_text())
    print(f"{out}: {m['train_tokens']:,} train tokens ({m['train_documents']:,} documents), "
          f"{m['val_tokens']:,} validation tokens ({m['val_documents']:,} documents), "
          f"{len(m['shards'])} shards, {m['dtype']}, tokenizer {m['tokenizer']['spec']} "
          f"(vocab {m['tokenizer']['vocab_size']})")
    print(f"train on it with: --data-dir {out}  (= --set data.prepared={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
