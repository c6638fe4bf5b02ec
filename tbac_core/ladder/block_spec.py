"""Per-block values: the one grammar of block weights and mix shares.

Pure Python: no torch, no ComfyUI. Both specs give every DiT block one number; they differ only in
what a number means (a weight, or the share of B in a mix), so they share this parser.

Grammar
-------
Case-insensitive, whitespace tolerant. A spec is a comma-separated list of items, applied left to
right (later items override earlier ones). Each item is ``[BLOCKS:]VALUE``:

BLOCKS, optional (absent means all blocks)
    ``*`` or ``all``; one block index ``3``; an inclusive range ``0-9`` or ``0..9``
    (``9-0`` is allowed and runs the other way, which matters for ramps).
    Block indices must be 0..B-1; negative block indices are not accepted.
VALUE
    one value (see below), or a linear ramp ``START->END`` spread over the selected blocks in
    order: the first gets START, the last END, a single block gets START.

Block weights (``parse_block_weights``)
    Every block starts at 1.0; an empty spec leaves all at 1.0. A value is a finite number
    (``0.8``, ``1``, ``.5``, ``1e-1``; a negative weight flips that block's contribution and is
    allowed on purpose). Ramps may also be written ``ramp START END``.
    Examples: ``0.8``; ``0-9:1.0, 10-19:0.6``; ``*:0.5``; ``ramp 1.0 0.2``; ``1.0->0.2``;
    ``0.5, 19:1``; ``10-19: 1->0``.
Mix shares (``parse_mix_spec``)
    Every block starts from A (share 0); an empty spec is an error. A value is ``a`` (0), ``b``
    (1) or a number in 0..1 (the share of B: ``0.25`` is 0.75·A + 0.25·B); ``fade`` is ``a->b``.
    Two more items name no blocks: ``fade FIRST-LAST`` (blocks before FIRST from A, FIRST..LAST
    from 0 to 1, blocks after LAST from B; FIRST <= LAST) and a list of letters, one per block,
    like ``aaaabbbb`` or ``a a b b`` (it must name every block).
    Examples (20 blocks): ``0-9:a, 10-19:b``, ``fade``, ``fade 5-14``, ``b, 0-4:a``, ``0.5``,
    ``10-19: 0->0.7``.

Errors (:class:`LayerSpecError`, saying what was wrong and the valid syntax): NaN or infinite
weights (including overflow like ``1e999``), a share outside 0..1, a block index outside 0..B-1,
a malformed item or number, a ramp without two values, an empty item.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import LayerSpecError
from .text import (
    EMPTY_ITEM,
    INT_RE,
    RANGE_RE,
    SpecError,
    check_count,
    check_text,
    inclusive_range,
    parse_int,
    spec_error,
    split_items,
)

__all__ = [
    "MIX_SPEC_SYNTAX",
    "WEIGHT_SPEC_SYNTAX",
    "BlockValueGrammar",
    "LayerSpecError",
    "parse_block_values",
    "parse_block_weights",
    "parse_mix_spec",
    "ramp",
]

# One-line grammar summaries, appended to syntax errors (and usable as UI tooltips).
WEIGHT_SPEC_SYNTAX = (
    "comma-separated items '[BLOCKS:]VALUE'; BLOCKS is '*', 'all', an index like 3 or a range "
    "like 0-9 / 0..9; VALUE is a finite number like 0.8 or a ramp 'ramp 1.0 0.2' / '1.0->0.2'; "
    "later items override earlier ones, blocks not mentioned keep 1.0"
)
MIX_SPEC_SYNTAX = (
    "comma-separated items '[BLOCKS:]VALUE' applied left to right, every block starting from A; BLOCKS is "
    "'*', 'all', an index like 3 or a range like 0-9 / 0..9; VALUE is 'a', 'b', a share of B from 0 to 1 "
    "like 0.25, 'fade' (= 'a->b'), 'b->a' or a ramp like '0->0.7'; or 'fade FIRST-LAST' (A before FIRST, "
    "B after LAST); or one letter per block like 'aabb'"
)

_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?")
_RAMP_WORD_RE = re.compile(r"ramp\b\s*(.*)")
_RAMP_ARROW_RE = re.compile(r"(.*?)\s*->\s*(.*)")


@dataclass(frozen=True)
class BlockValueGrammar:
    """What one per-block spec language means by a value; the items around it are shared."""

    error: SpecError  # (spec, problem, hint=None) -> LayerSpecError, echoing the spec
    syntax: str  # the one-line summary, for hints
    start: float  # every block's value before the first item
    value: Callable[[str, str], float]  # (VALUE text, spec) -> one number, or raises
    noun: str  # what a value is called in messages: 'weight', 'share'
    expected: str  # what a value may be, for "'x' is not ..." messages
    example: str  # a value to suggest, as in '0-9:0.6'
    empty_problem: str | None = None  # None: an empty spec leaves every block at ``start``
    ramp_keyword: bool = False  # also accept 'ramp START END'
    named_ramps: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # 'fade': (0, 1)
    # Items that name no blocks ('aabb', 'fade 5-14'): (item, spec, num_blocks) -> values or None.
    whole_item: Callable[[str, str, int], list[float] | None] | None = None


def ramp(start: float, end: float, count: int) -> list[float]:
    """``count`` values from ``start`` to ``end``; one value is ``start``."""
    if count == 1:
        return [start]
    # start*(1-u) + end*u (not start + (end-start)*u): exact at both ends, no overflow of end-start.
    # Its two products can round outside the ends (both halves of a subnormal round to 0), so each
    # value is held between them.
    low, high = min(start, end), max(start, end)
    return [min(max(start * (1 - i / (count - 1)) + end * (i / (count - 1)), low), high) for i in range(count)]


def _parse_float(text: str) -> float | None:
    """The float an ASCII decimal number names (may overflow to inf); None if it is not one."""
    return float(text) if _FLOAT_RE.fullmatch(text) else None


def _block_index(text: str, spec: str, num_blocks: int, grammar: BlockValueGrammar) -> int:
    index = parse_int(text, spec, "block", grammar.error)
    if not 0 <= index < num_blocks:
        raise grammar.error(spec, f"block {index} is out of range", f"Valid blocks are 0..{num_blocks - 1}.")
    return index


def _block_range(match: re.Match, spec: str, num_blocks: int, grammar: BlockValueGrammar) -> tuple[int, int]:
    first, last = (_block_index(end, spec, num_blocks, grammar) for end in match.groups())
    return first, last


def _select_blocks(text: str, spec: str, num_blocks: int, grammar: BlockValueGrammar) -> list[int]:
    """The blocks a BLOCKS selector names, in the order written (it matters for ramps)."""
    if text in ("*", "all"):
        return list(range(num_blocks))
    if INT_RE.fullmatch(text):
        return [_block_index(text, spec, num_blocks, grammar)]
    match = RANGE_RE.fullmatch(text)
    if match:
        return inclusive_range(*_block_range(match, spec, num_blocks, grammar))
    if not text:
        raise grammar.error(spec, "a block selector is missing before ':'")
    raise grammar.error(
        spec,
        f"{text!r} is not a block selector",
        f"Valid blocks are 0..{num_blocks - 1}. Valid syntax: {grammar.syntax}.",
    )


def _ramp_ends(text: str, spec: str, grammar: BlockValueGrammar) -> tuple[str, str] | None:
    """('1.0', '0.2') for 'ramp 1.0 0.2' or '1.0->0.2'; None when text is not a ramp."""
    match = _RAMP_WORD_RE.fullmatch(text) if grammar.ramp_keyword else None
    if match:
        ends = match.group(1).split()
        if len(ends) != 2:
            raise grammar.error(spec, f"{text!r} needs exactly two values, like 'ramp 1.0 0.2'")
        return ends[0], ends[1]
    match = _RAMP_ARROW_RE.fullmatch(text)
    if match:
        if not match.group(1) or not match.group(2):
            raise grammar.error(
                spec, f"a value is missing: the ramp {text!r} needs a value on each side of '->'"
            )
        return match.group(1), match.group(2)
    return None


def _values(text: str, count: int, spec: str, grammar: BlockValueGrammar) -> list[float]:
    """The values VALUE gives to ``count`` selected blocks: one value or a linear ramp."""
    if not text:
        raise grammar.error(spec, "a value is missing")
    if text in grammar.named_ramps:
        return ramp(*grammar.named_ramps[text], count)
    ends = _ramp_ends(text, spec, grammar)
    if ends is not None:
        start, end = (grammar.value(value, spec) for value in ends)
        return ramp(start, end, count)
    if RANGE_RE.fullmatch(text):  # a common slip: '0-9' meant as blocks, value forgotten
        raise grammar.error(
            spec,
            f"{text!r} is not {grammar.expected}: blocks {text!r} have no {grammar.noun}; "
            f"write e.g. '{text}:{grammar.example}'",
        )
    return [grammar.value(text, spec)] * count


def parse_block_values(spec: str, num_blocks: int, grammar: BlockValueGrammar) -> list[float]:
    """One value per block (``num_blocks`` floats) from a spec in ``grammar``'s language."""
    check_count(num_blocks, "num_blocks", 1)
    spec = check_text(spec, grammar.error)
    if not spec.strip() and grammar.empty_problem is not None:
        raise grammar.error(spec, grammar.empty_problem)
    values = [grammar.start] * num_blocks
    for item in split_items(spec):
        if not item:
            raise grammar.error(spec, EMPTY_ITEM)
        if ":" in item:  # BLOCKS never contains ':', so the first ':' ends it
            blocks_text, _, value_text = item.partition(":")
            blocks = _select_blocks(blocks_text.strip(), spec, num_blocks, grammar)
            item_values = _values(value_text.strip(), len(blocks), spec, grammar)
        else:
            blocks = list(range(num_blocks))
            whole = grammar.whole_item(item, spec, num_blocks) if grammar.whole_item else None
            item_values = whole if whole is not None else _values(item, num_blocks, spec, grammar)
        for block, value in zip(blocks, item_values):
            values[block] = value
    return values


# --------------------------------------------------------------------------- block weights

_weight_error = spec_error("block-weight", WEIGHT_SPEC_SYNTAX)
_NON_FINITE_WORDS = {"nan", "inf", "infinity"}
_FINITE_HINT = "Weights must be finite numbers."


def _weight(text: str, spec: str) -> float:
    """One finite float; NaN/inf are refused because they would poison the whole image."""
    if text.lstrip("+-") in _NON_FINITE_WORDS:
        raise _weight_error(spec, f"weight {text!r} is not finite", _FINITE_HINT)
    value = _parse_float(text)
    if value is None:
        raise _weight_error(spec, f"{text!r} is not a number")
    if not math.isfinite(value):
        raise _weight_error(spec, f"weight {text!r} overflows to {value}", _FINITE_HINT)
    return value


_WEIGHTS = BlockValueGrammar(
    error=_weight_error,
    syntax=WEIGHT_SPEC_SYNTAX,
    start=1.0,
    value=_weight,
    noun="weight",
    expected="a number",
    example="0.6",
    ramp_keyword=True,
)


def parse_block_weights(spec: str, num_blocks: int) -> list[float]:
    """Per-block strength multipliers: a list of exactly num_blocks finite floats.

    Blocks start at 1.0; items apply left to right. See the module docstring for the grammar.
    Negative weights are allowed; NaN and infinity are not. Raises LayerSpecError.
    """
    weights = parse_block_values(spec, num_blocks, _WEIGHTS)
    # Ramp ends within float range stay finite, but rounding at the very edge of that range
    # (ends near 1.8e308) could still overflow, so check the result rather than trust it.
    if not all(math.isfinite(w) for w in weights):
        raise _weight_error(spec, "a ramp overflows the float range", _FINITE_HINT)
    return weights


# --------------------------------------------------------------------------- mix shares

_mix_error = spec_error("mix", MIX_SPEC_SYNTAX)
_LETTERS_RE = re.compile(r"[ab](?:\s*[ab])+")
_FADE_BETWEEN_RE = re.compile(r"fade\s+(.+)")


def _share(text: str, spec: str) -> float:
    """One share of B: 'a', 'b' or a number in 0..1."""
    if text == "a":
        return 0.0
    if text == "b":
        return 1.0
    value = _parse_float(text)
    if value is None:
        raise _mix_error(spec, f"{text!r} is not 'a', 'b' or a number")
    if not 0.0 <= value <= 1.0:
        raise _mix_error(
            spec,
            f"share {text} is outside 0..1",
            "A share of B must lie in 0..1 (0 = A, 1 = B); use the Weight node to strengthen a block.",
        )
    return value


def _mix_whole_item(item: str, spec: str, num_blocks: int) -> list[float] | None:
    """The shares of 'aabb' (one letter per block) and 'fade FIRST-LAST'; None for other items."""
    if _LETTERS_RE.fullmatch(item):
        letters = item.replace(" ", "")
        if len(letters) != num_blocks:
            half = num_blocks // 2
            raise _mix_error(
                spec,
                f"the letter list {letters!r} names {len(letters)} blocks but the DiT has {num_blocks}",
                f"Write one letter (a or b) per block, e.g. {'a' * half + 'b' * (num_blocks - half)!r}.",
            )
        return [0.0 if c == "a" else 1.0 for c in letters]
    fade = _FADE_BETWEEN_RE.fullmatch(item)
    if not fade:
        return None
    match = RANGE_RE.fullmatch(fade.group(1))
    if not match:
        raise _mix_error(spec, f"'fade' needs two blocks like 'fade 5-14', got {fade.group(1)!r}")
    first, last = _block_range(match, spec, num_blocks, _MIX)
    if first > last:
        raise _mix_error(
            spec,
            f"'fade {first}-{last}' runs backwards; write the lower block first "
            f"(to fade from B to A, swap the inputs or write '{last}-{first}:b->a')",
        )
    return [0.0] * first + ramp(0.0, 1.0, last - first + 1) + [1.0] * (num_blocks - 1 - last)


_MIX = BlockValueGrammar(
    error=_mix_error,
    syntax=MIX_SPEC_SYNTAX,
    start=0.0,
    value=_share,
    noun="share",
    expected="'a', 'b' or a number",
    example="b",
    empty_problem="it is empty (write e.g. 'fade' or '0-9:a, 10-19:b')",
    named_ramps={"fade": (0.0, 1.0)},
    whole_item=_mix_whole_item,
)


def parse_mix_spec(spec: str, num_blocks: int) -> list[float]:
    """The share of B (0 = A, 1 = B) for each of ``num_blocks`` DiT blocks.

    See the module docstring for the grammar. Raises ``LayerSpecError`` (what was wrong and the
    valid syntax) for a malformed spec, an empty one, a block out of range or a share outside 0..1.
    """
    return parse_block_values(spec, num_blocks, _MIX)
