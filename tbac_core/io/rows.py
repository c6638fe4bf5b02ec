"""Reading a rows file: one record (a dict of field -> value) per CSV/TSV line or JSON object.

``.jsonl``/``.ndjson`` (one JSON object per line; blank lines and ``#`` / ``//`` lines are
skipped), ``.json`` (a list of objects), ``.csv`` / ``.tsv`` (a header of field names; a byte
order mark is accepted). A problem in one record is kept on that record, so a batch can report it
and go on with the others; a file that cannot be read at all is a ``UsageError``. Size and JSON
nesting are bounded (see ``jsonfile``).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .jsonfile import MAX_JSON_BYTES, parse_json, read_text_bounded

ROWS_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
MAX_ROWS_FILE_BYTES = MAX_JSON_BYTES


@dataclass
class Record:
    """One row as read: where it is, its raw values, and what was wrong with it as read."""

    where: str  # "prompts.csv line 4"
    data: Any  # a dict for a usable row (CSV: every value is a string)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, message)


def read_records(path: str | os.PathLike) -> tuple[list[Record], bool]:
    """The records of a rows file and whether its values are text (CSV/TSV) rather than JSON values."""
    path = Path(path)
    ext = path.suffix.lower()
    content = read_text_bounded(path, "rows file", max_bytes=MAX_ROWS_FILE_BYTES, encoding="utf-8-sig")
    if ext in (".csv", ".tsv"):
        return _csv_records(path, content, "\t" if ext == ".tsv" else ","), True
    if ext == ".json":
        data = parse_json(content, str(path))
        if not isinstance(data, list):
            raise UsageError(f"{path}: a .json rows file must hold a list of objects (or use .jsonl).")
        return [Record(f"{path.name} item {i}", item) for i, item in enumerate(data, 1)], False
    records = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "//")):
            continue
        where = f"{path.name} line {line_no}"
        try:
            records.append(Record(where, parse_json(line, where)))
        except UsageError as exc:
            records.append(Record(where, {}, [("row", str(exc).removeprefix(f"{where}: "))]))
    return records, False


def _csv_records(path: Path, content: str, delimiter: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
    records = []
    try:
        for data in reader:
            extra = data.pop(None, None)  # cells beyond the header
            record = Record(f"{path.name} line {reader.line_num}", data)
            if extra and any(cell.strip() for cell in extra):
                record.problems.append(("row", f"{len(extra)} more cell(s) than header columns"))
            records.append(record)
    except csv.Error as exc:
        raise UsageError(f"Cannot read the rows file {path}: {exc}") from exc
    return records

