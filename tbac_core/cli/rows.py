"""Batch rows: the records of a rows file (``tbac_core.io.rows``) as job values, with their problems.

A problem in a row (an unknown field, a wrong type, an id that is no usable file name) is kept on
the row, so the batch reports it and goes on with the others.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import check_name_length, read_records, safe_name
from ..params import MAX_BATCH
from .jobs import ALIASES, FIELDS, coerce

ROW_NAME_KEYS = ("id", "name")  # batch row naming; ``id`` wins over ``name``


@dataclass
class Row:
    """One batch row as read: its number, where it is, its id and its converted values."""

    index: int  # 1-based, counting rows (not lines)
    where: str  # "prompts.csv line 4"
    id: str
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Rows of a ``.jsonl``/``.ndjson``, ``.json``, ``.csv`` or ``.tsv`` file (see ``tbac_core.io.rows``).

    Paths in ``images`` / ``init_image`` are relative to the rows file's folder.
    """
    path = Path(path)
    records, text = read_records(path)
    rows, seen = [], {}
    for index, record in enumerate(records, 1):
        row = Row(index, record.where, f"row{index:04d}", problems=list(record.problems))
        rows.append(row)
        if not isinstance(record.data, dict):
            row.problems.append(("row", f"expected a JSON object, got {type(record.data).__name__}"))
            continue
        name = _read_values(row, record.data, text, path.parent)
        if name is not None:
            _set_id(row, name)
        if row.id in seen:
            row.problems.append(("id", f"{row.id!r} is already used by row {seen[row.id]}; ids name the output "
                                       f"files, so they must be unique"))
        else:
            seen[row.id] = index
    return rows


def _read_values(row: Row, data: dict, text: bool, base_dir: Path) -> Any:
    """Convert ``data`` into ``row.values`` (problems onto the row); returns the row's name, if any."""
    names = {}
    for raw_key, value in data.items():
        key = str(raw_key or "").strip().lower().replace("-", "_").replace(" ", "_")
        if not key or key.startswith(("_", "#")):
            continue  # comment column, or the empty header of a trailing CSV comma
        if key in ROW_NAME_KEYS:
            if value not in (None, ""):
                names[key] = value
            continue
        if key not in ALIASES:
            close = difflib.get_close_matches(key, [*ALIASES, *ROW_NAME_KEYS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            row.problems.append((str(raw_key)[:80], f"unknown field{hint}; allowed: "
                                                     f"{', '.join([*FIELDS, *ROW_NAME_KEYS])}"))
            continue
        name = ALIASES[key]
        try:
            converted = coerce(name, value, text=text, base_dir=base_dir)
        except ValueError as exc:
            row.problems.append((name, str(exc)))
            continue
        if converted is not None:
            row.values[name] = converted
    return names.get("id", names.get("name"))


def _set_id(row: Row, name: Any) -> None:
    """Use ``name`` as the row's id (its outputs are ``<id>_<k>.png``) unless it is no usable file name."""
    candidate = safe_name(name)
    if not candidate:
        row.problems.append(("id", f"{str(name)[:80]!r} gives an empty file name; use letters, digits, '.', '_', '-'"))
        return
    try:
        check_name_length(f"{candidate}_{MAX_BATCH - 1}.png", f"id {candidate[:40]!r}...")
    except UsageError as exc:
        row.problems.append(("id", str(exc)))
        return
    row.id = candidate
