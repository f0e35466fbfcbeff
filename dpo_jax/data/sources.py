"""Where preference rows come from: a hub dataset, a data file or a ``save_to_disk`` folder.

Errors name the file and the row or line. Both count from 1: "row 7" is the 7th row of the
data, "line 9" the 9th line of the file as an editor shows it (they differ where a JSONL file
has blank lines, or for a CSV file's header). datasets' own errors come from deep inside arrow,
so a file it cannot read is diagnosed here.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from pathlib import Path

import datasets

from dpo_jax import storage
from dpo_jax.errors import DpoError
from dpo_jax.hub import hub_reachable as probe

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(DpoError, ValueError):
    """Bad preference data: the message names the file (or dataset) and the row."""


@dataclasses.dataclass
class Rows:
    """The rows of a source, and how many lines were skipped before they could be rows."""

    dataset: object            # a datasets.Dataset
    unparsable_lines: int = 0  # (on_bad_row="skip") JSONL lines that did not parse


def hub_reachable() -> bool:
    return probe()


def load_rows(cfg):
    """The raw rows of ``cfg.source`` as a ``datasets.Dataset``."""
    return read_source(cfg).dataset


def read_source(cfg) -> Rows:
    """The rows of ``cfg.source`` (a Source) with the count of lines skipped on the way."""
    datasets.disable_progress_bars()  # a file's few rows need no bar; the summary line says
    if storage.is_url(cfg.source):  # an object store: a local copy, read as a local file is,
        # errors naming the URL (every process fetches it and keeps its share, as for a file)
        local = storage.fetch(cfg.source, "dataset_name")
        try:
            return read_source(dataclasses.replace(cfg, source=str(local)))
        except DataError as e:
            raise DataError(str(e).replace(str(local), cfg.source)) from None
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; it has {sorted(ds)}")
            ds = ds[cfg.split]
        return Rows(ds)
    if path.suffix.lower() in FILE_FORMATS:
        if not path.exists():
            raise DataError(f"{path}: no such data file")
        return _load_file(path, FILE_FORMATS[path.suffix.lower()], cfg)
    if path.exists() or cfg.source.startswith((".", "/", "~")):
        raise DataError(f"{cfg.source}: not a data file (expected one of {sorted(FILE_FORMATS)}) "
                        "nor a save_to_disk folder")
    if not hub_reachable():
        raise DataError(f"{cfg.source!r} is not a local file or folder and the Hugging Face Hub "
                        "cannot be reached (offline). Pass a .json/.jsonl/.parquet/.csv file or a "
                        "save_to_disk folder instead")
    try:
        return Rows(datasets.load_dataset(cfg.source, split=cfg.split))
    except Exception as e:
        raise DataError(f"could not load hub dataset {cfg.source!r} split {cfg.split!r}: "
                        f"{type(e).__name__}: {e}") from None


def _first_non_utf8(path: Path) -> str | None:
    """Where a text file stops being UTF-8 (arrow does not check; it fails later, far away)."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(e.start, 0)].count(b"\n")
                return (f"line {line}: bytes that are not UTF-8 ({e.reason} near byte "
                        f"{offset + e.start})")
            offset += len(chunk)
            line += chunk.count(b"\n")
    return None


def describe_row(source: str, index: int) -> str:
    """"row N" (1-based) of the data, with the file's line where a text file has one."""
    row = f"row {index + 1}"
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv") or not path.is_file():
        return row
    if suffix == ".csv":
        return f"{row} (line {index + 2}, after the header)"
    seen = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                if seen == index:
                    return row if line_no == index + 1 else f"{row} (line {line_no})"
                seen += 1
    return row


def _load_file(path: Path, fmt: str, cfg) -> Rows:
    is_jsonl = fmt == "json" and path.suffix.lower() == ".jsonl"
    if fmt in ("json", "csv") and _blank(path):
        raise DataError(f"{path}: the file is empty (no rows)")
    if fmt in ("json", "csv") and (problem := _first_non_utf8(path)):
        if cfg.on_bad_row == "skip" and is_jsonl:
            return _load_jsonl_skipping(path)
        raise DataError(f"{path}: {problem}")
    try:
        return Rows(datasets.load_dataset(fmt, data_files=str(path), split="train"))
    except Exception as e:
        if "corresponds to no data" in str(e):
            raise DataError(f"{path}: holds no rows") from None
        # datasets' errors come from deep inside arrow; find and name the offending line ourselves.
        problem = _diagnose_text_file(path, fmt)
        if problem is None:
            raise DataError(f"{path}: could not be read as {fmt}: {type(e).__name__}: {e}") from None
        if cfg.on_bad_row == "skip" and is_jsonl:
            return _load_jsonl_skipping(path)
        raise DataError(f"{path}: {problem}") from None


def _blank(path: Path) -> bool:
    """Whether a text file holds nothing but whitespace (read at most 64 KiB to say no)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _diagnose_text_file(path: Path, fmt: str) -> str | None:
    """The first unparsable line of a JSON(L) file, described; None if none found."""
    if fmt != "json":
        return None
    text = path.read_text(encoding="utf-8")  # UTF-8 was checked before loading
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
        return None
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {i}: malformed JSON line ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {i}: expected a JSON object, got {type(row).__name__}"
    # Parsable but inconsistent types across rows (e.g. a number in a text column):
    rows = [(i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    for key in {k for _, r in rows for k in r}:
        kinds = {}
        for i, r in rows:
            v = r.get(key)
            if v is not None:
                kinds.setdefault(type(v).__name__, i)
        if len(kinds) > 1:
            (k1, i1), (k2, i2) = sorted(kinds.items(), key=lambda kv: kv[1])[:2]
            return (f"line {i2}: column {key!r} holds a {k2} where earlier lines hold {k1} "
                    f"(first at line {i1})")
    return None


def _load_jsonl_skipping(path: Path) -> Rows:
    """Skip mode for a JSONL file datasets cannot read: keep the lines that parse, count the rest."""
    rows, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError
                rows.append(row)
            except (UnicodeDecodeError, ValueError):
                bad += bool(raw.strip())
    # Mixed types across rows cannot form an arrow column: keep them as JSON-encoded objects and
    # let row validation sort them out.
    keys = sorted({k for r in rows for k in r})
    cols = {k: [r.get(k) for r in rows] for k in keys}
    try:
        ds = datasets.Dataset.from_dict(cols)
    except Exception:
        ds = datasets.Dataset.from_dict({k: [json.dumps(v) if not isinstance(v, str) and v is not None
                                             else v for v in vs] for k, vs in cols.items()})
    return Rows(ds, unparsable_lines=bad)
