"""The rows of a batch: one job per row, read from JSONL or CSV.

Keys/columns named ``node_id.input`` override that input; ``id`` (or ``name``) names the row. A row
that cannot be used (bad JSON, a key that is no override, an id that cannot be a file name, a value
that is not JSON) comes back with ``error`` set: it is reported and skipped, the others go on.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from typing import Any, Mapping

from .errors import RowsError
from .inputs import json_value_problem, parse_json, read_input_text, text_problem

RESERVED_KEYS = ("id", "name")  # row naming; ``id`` wins over ``name``
# Row ids start every output file name; with ``_<node>_<n>.<ext>`` appended they must stay well under
# the 255-byte name limit of common file systems.
MAX_ROW_ID_LENGTH = 100
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass
class Row:
    """One job: where it came from, its name and its ``node_id.input`` overrides.

    ``text`` is True for rows read from CSV, whose values are all strings and need converting;
    ``error`` is set when the row itself could not be read (the batch goes on without it).
    """

    index: int
    id: str
    overrides: dict[str, Any]
    where: str = ""
    text: bool = False
    error: str | None = None


def safe_name(value: Any) -> str:
    """Make ``value`` usable in a file name on every OS (the ids end up in output names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")


def _row_id(name: Any, index: int) -> tuple[str, str | None]:
    """(row id, error): the file-name-safe id of a row named ``name``, or a positional id and why not."""
    fallback = f"row{index:04d}"
    if name is None:
        return fallback, None
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        return fallback, f"the row id must be text or a number, got {type(name).__name__}"
    text = str(name)
    if isinstance(name, str) and (problem := text_problem(name)):
        return fallback, f"the row id {problem}"
    if _CONTROL_CHARS.search(text):
        return fallback, f"the row id {text[:40]!r} contains control characters (NUL, newline...); they are not allowed"
    row_id = safe_name(text)
    if len(row_id) > MAX_ROW_ID_LENGTH:
        return fallback, (f"the row id is {len(row_id)} characters long; at most {MAX_ROW_ID_LENGTH} are allowed "
                          f"(it starts the output file names)")
    return row_id or fallback, None


def make_row(data: Mapping[str, Any], index: int, where: str = "", text: bool = False) -> Row:
    """Build a Row from one JSONL object / CSV record: split naming keys from overrides."""
    overrides: dict[str, Any] = {}
    name = None
    errors = []
    for key, value in data.items():
        key = str(key).strip() if key is not None else ""
        if key in RESERVED_KEYS:
            if value not in (None, "") and (name is None or key == "id"):
                name = value
        elif not key or key.startswith(("_", "#")):
            continue  # comment column, or the empty header of a trailing CSV comma
        elif problem := text_problem(key):
            errors.append(f"a key {problem}")
        elif "." not in key:
            errors.append(
                f"column/key {key!r} is not of the form node_id.input (reserved: {', '.join(RESERVED_KEYS)}; "
                f"prefix comment columns with '_')"
            )
        elif text and value in (None, ""):
            continue  # empty CSV cell: keep the workflow's value for this row
        elif problem := json_value_problem(value):
            errors.append(f"{key}: {problem}")
        else:
            overrides[key] = value
    row_id, id_error = _row_id(name, index)
    if id_error:
        errors.insert(0, id_error)
    return Row(index, row_id, overrides, where, text, "; ".join(errors) or None)


def load_rows(path: str | os.PathLike) -> list[Row]:
    """Read rows from ``.csv``/``.tsv`` (header of ``node_id.input`` columns) or JSONL (``.jsonl``/``.ndjson``).

    A ``.json`` file may also hold a list of row objects. Rows that cannot be parsed come back with
    ``error`` set rather than stopping the batch; a file that cannot be read at all raises RowsError.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv"):
        # utf-8-sig: spreadsheets like to start CSV files with a byte order mark.
        return _csv_rows(read_input_text(path, "rows file", RowsError, "utf-8-sig"), path, ext)
    content = read_input_text(path, "rows file", RowsError)
    if ext == ".json":
        data = parse_json(content, path, RowsError)
        if not isinstance(data, list):
            raise RowsError(f"{path}: a .json rows file must hold a list of objects (or use .jsonl)")
        return [_row_from_json(obj, i, f"{path} item {i}") for i, obj in enumerate(data, 1)]
    rows = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "//")):
            continue
        index = len(rows) + 1
        try:
            obj = parse_json(line, "", RowsError)
        except RowsError as e:
            rows.append(Row(index, f"row{index:04d}", {}, f"{path} line {line_no}", error=str(e)))
            continue
        rows.append(_row_from_json(obj, index, f"{path} line {line_no}"))
    return rows


def _csv_rows(content: str, path: str, ext: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    rows = []
    try:
        if not reader.fieldnames:
            return []
        for i, record in enumerate(reader, 1):
            extra = record.pop(None, None)  # cells beyond the header
            row = make_row(record, i, f"{path} line {reader.line_num}", text=True)
            if extra and any(c.strip() for c in extra):
                row.error = _join(row.error, f"{len(extra)} more cell(s) than header columns")
            rows.append(row)
    except csv.Error as e:  # a cell over csv's size limit, an unterminated quote...
        raise RowsError(f"{path} line {reader.line_num}: not readable as {ext[1:].upper()} ({e})") from None
    return rows


def _row_from_json(obj: Any, index: int, where: str) -> Row:
    if not isinstance(obj, dict):
        return Row(index, f"row{index:04d}", {}, where, error=f"expected a JSON object, got {type(obj).__name__}")
    return make_row(obj, index, where)


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b
