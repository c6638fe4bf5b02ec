"""Reading JSON from files users give us, with bounds: never a RecursionError or MemoryError.

``json.loads`` recurses once per nesting level, so ``[[[[...]]]]`` a few thousand deep raises
``RecursionError`` (or worse, deep inside later code); a multi-GB file is read whole. Both are
refused here with the project's own error and a message naming the file.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import TBACError, UsageError

MAX_JSON_DEPTH = 64  # no file we read legitimately nests deeper than a handful of levels
MAX_JSON_BYTES = 64 * 1024 * 1024
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = str.maketrans("", "", "".join(chr(c) for c in range(128) if chr(c) not in "[]{}"))


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text`` (brackets inside strings do not count)."""
    brackets = _STRING.sub("", text).translate(_NOT_BRACKET)
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where: str, *, error: type[TBACError] = UsageError,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, raising ``error`` (with ``where`` in the message) for bad or too deep JSON."""
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep; at most {max_depth} levels are allowed.")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{where}: not valid JSON ({exc}).") from exc


def read_text_bounded(path: str | os.PathLike, what: str, *, error: type[TBACError] = UsageError,
                      max_bytes: int = MAX_JSON_BYTES, encoding: str = "utf-8") -> str:
    """The text of a regular file of at most ``max_bytes``; ``error`` for anything else."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise error(f"Cannot read the {what} {path}: not a regular file.")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"Cannot read the {what} {path}: {exc.strerror or exc}.") from exc
    if len(data) > max_bytes:
        raise error(f"The {what} {path} is larger than {max_bytes // (1024 * 1024)} MiB; split it into smaller files.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"Cannot read the {what} {path}: not {encoding} text ({exc}).") from exc


def read_json(path: str | os.PathLike, what: str = "JSON file", *, error: type[TBACError] = UsageError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of a file, bounded in size and depth; ``error`` says what was wrong."""
    return parse_json(read_text_bounded(path, what, error=error, max_bytes=max_bytes), str(path), error=error)
