"""Reading and echoing user text: what every ladder spec grammar and summary shares.

The layer spec (``layer_spec``) and the per-block specs (``block_spec``: weights, mixes) are
comma-separated items, case-insensitive and whitespace tolerant, with ASCII whole numbers and
inclusive ranges ``A-B`` / ``A..B``; their errors all read
``Invalid <kind> spec '<the spec>': <problem>. <hint>``. This module holds those pieces once.
"""
from __future__ import annotations

import re
from typing import Callable

from ..errors import LayerSpecError

# Numbers are ASCII only: Python's int()/float() would accept other scripts' digits.
INT = r"[+-]?[0-9]+"
INT_RE = re.compile(INT)
# Rule for '-': one directly after a digit (spaces allowed) separates the ends; any other is a sign.
RANGE_RE = re.compile(rf"({INT})\s*(?:\.\.|-)\s*({INT})")

EMPTY_ITEM = "it has an empty item (two commas in a row or a stray comma)"
ECHO_LIMIT = 200  # a pasted novel should not flood the ComfyUI error popup

SpecError = Callable[..., LayerSpecError]  # (spec, problem, hint=None) -> the error to raise


def echo(spec: object) -> str:
    """repr() of the spec, shortened so huge inputs still give a readable message."""
    text = repr(spec)
    if len(text) > ECHO_LIMIT:
        text = text[: ECHO_LIMIT - 5] + "...'"
    return text


def shorten(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters (for prompts in summaries and titles)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spec_error(kind: str, syntax: str) -> SpecError:
    """The error factory of one grammar: the hint defaults to the grammar's one-line syntax."""

    def make(spec: object, problem: str, hint: str | None = None) -> LayerSpecError:
        hint = hint if hint is not None else f"Valid syntax: {syntax}."
        return LayerSpecError(f"Invalid {kind} spec {echo(spec)}: {problem}. {hint}")

    return make


def check_count(value: object, name: str, minimum: int) -> int:
    """Model sizes come from code, not users, but a clear error beats an IndexError later."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LayerSpecError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return value


def check_text(spec: object, error: SpecError) -> str:
    if not isinstance(spec, str):
        raise error(spec, f"expected a string, got {type(spec).__name__}")
    return spec


def split_items(spec: str) -> list[str]:
    """Split on commas and normalise case and whitespace; [] for a blank spec."""
    if not spec.strip():
        return []
    return [" ".join(raw.lower().split()) for raw in spec.split(",")]


def parse_int(text: str, spec: str, what: str, error: SpecError) -> int:
    """int() of an already-validated digit string; int() refuses > 4300 digits."""
    try:
        return int(text)
    except ValueError:
        raise error(spec, f"{what} {text[:20]!r}... is far too long a number") from None


def inclusive_range(first: int, last: int) -> list[int]:
    """first..last inclusive, descending when first > last."""
    direction = 1 if last >= first else -1
    return list(range(first, last + direction, direction))
