"""Reading the user's input files safely: regular files of bounded size, JSON of bounded depth and
only JSON types, so a hostile or broken file ends in a QueueError instead of a hang, a memory blow-up
or a RecursionError."""
from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

from .errors import QueueError

MAX_INPUT_BYTES = 256 * 1024**2  # workflow and rows files; real ones are kilobytes
MAX_JSON_DEPTH = 64  # nesting of objects/lists in a workflow or a row value; API workflows use ~4
MAX_JSON_INT = 2**64  # ComfyUI seeds go up to 2**64 - 1; larger numbers are typos (and slow to print)


def read_input_text(path: str | os.PathLike, what: str, error: type[QueueError], encoding: str = "utf-8") -> str:
    """The text of the ``what`` file at ``path``; refuses missing, special (FIFO, device) and huge files."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path!r} is not a regular file")
        if info.st_size > MAX_INPUT_BYTES:
            raise error(f"{what} {path!r} is {info.st_size} bytes; at most {MAX_INPUT_BYTES} are allowed")
        with open(path, encoding=encoding, newline="") as f:
            return f.read(MAX_INPUT_BYTES + 1)
    except UnicodeDecodeError as e:
        raise error(f"{what} {path!r} is not {encoding} text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def parse_json(text: str, where: str, error: type[QueueError]) -> Any:
    """``json.loads`` whose failures (syntax, nesting, numbers too long) are ``error``s naming ``where``
    (no prefix when ``where`` is empty)."""
    prefix = f"{where}: " if where else ""
    try:
        data = json.loads(text)
    except RecursionError:
        raise error(f"{prefix}JSON nested too deeply (at most {MAX_JSON_DEPTH} levels are allowed)") from None
    except ValueError as e:  # JSONDecodeError, and ints over Python's digit limit
        raise error(f"{prefix}invalid JSON ({e})") from None
    problem = json_value_problem(data)
    if problem:
        raise error(prefix + problem)
    return data


def json_value_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` cannot be sent to ComfyUI as JSON, or None when it can.

    Allowed: null, true/false, integers between -2**64 and 2**64, finite floats, valid Unicode text (no
    lone surrogates), lists, and objects with text keys, nested at most ``max_depth`` levels. Walks
    iteratively, so any depth is safe to check.
    """
    stack = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        where = path or "the value"
        if depth > max_depth:
            return f"{where} is nested deeper than {max_depth} levels"
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if abs(item) > MAX_JSON_INT:
                return f"{where} is an integer of {item.bit_length()} bits; integers must lie between -2**64 and 2**64"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} is {item!r}; only finite numbers are allowed"
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{where} {problem}"
        elif isinstance(item, (list, tuple)):
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(item))
        elif isinstance(item, dict):
            for key, x in item.items():
                if not isinstance(key, str):
                    return f"{where} has the key {key!r} of type {type(key).__name__}; keys must be text"
                problem = text_problem(key)
                if problem:
                    return f"a key of {where} {problem}"
                stack.append((x, depth + 1, f"{path}.{_short(key)}" if path else _short(key)))
        else:
            return (f"{where} is of type {type(item).__name__}; allowed are null, true/false, numbers, "
                    f"text, lists and objects")
    return None


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate from a ``\\ud800`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate U+{ord(text[e.start]):04X} at position {e.start}; text must be valid Unicode"
    return None


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
