"""Parse the user-facing *layer spec* and *block weight* strings of TBAC-UniImage.

Pure Python: no torch, no ComfyUI. Everything here works on plain ints and floats.

Vocabulary
----------
*Rungs* are the MLLM hidden-state entries the DiT can read. With R rungs
(R = num_hidden_layers + 1; 37 for the real model, 7 for the tiny fixture):

* rung 0          = input embeddings,
* rung i (1..R-2) = output of decoder layer i-1,
* rung R-1        = output of the final RMSNorm.

The DiT has B *blocks* (20 real, 4 tiny); each block reads exactly one rung. The trained
("default") mapping feeds block i with rung R-1-B+i: the last B rungs before the final norm
(real model: rungs 16..35; tiny fixture: rungs 2..5).

Layer spec grammar
------------------
Case-insensitive; whitespace around and inside items is ignored except inside a number.
A spec is a comma-separated list of items; the rungs of all items are concatenated in order.
An empty (or all-whitespace) spec means ``default``. Empty items (``0,,4``) are errors.

Each item is ``SELECTOR [STEP] [reversed]``, in that order:

SELECTOR, one of
    ``default``   the trained rungs R-1-B .. R-2 (needs B <= R-1)
    ``all``       rungs 0 .. R-1
    ``final``     rung R-1 (the final-norm output)
    ``last N``    the N rungs just before the final norm: R-1-N .. R-2 (N in 1..R-1)
    ``I``         one index; negative indices count from the end like Python
                  (``-1`` = R-1 = final norm, ``-2`` = output of the last decoder layer);
                  valid indices are -R .. R-1
    ``A-B``       inclusive range, ends may be negative and are resolved first;
    ``A..B``      ``35-16`` / ``35..16`` give a descending order.
                  Rule for ``-``: a ``-`` directly after a digit (spaces allowed) separates
                  the two ends; any other ``-`` is a minus sign. So ``-10--2`` is -10 to -2,
                  ``-10-2`` is -10 to 2 and ``5--3`` is 5 to -3. ``..`` always separates.
STEP, optional
    ``:N`` or ``every N`` with N a whole number >= 1: keep every N-th rung of the
    selector's list, starting with its first (``16-35:2`` -> 16, 18, ..., 34).
``reversed`` / ``reverse``, optional
    reverse this item's rungs (after the step): ``default reversed``, ``16-35:2 reversed``.

A ``reversed`` item on its own reverses everything before it: ``0,4,8,reversed`` -> 8,4,0.

Errors (:class:`LayerSpecError`): an index outside -R..R-1, a malformed item, a step that is
missing, not a whole number, zero or negative, ``last N`` with N outside 1..R-1, ``default``
when B > R-1, a lone ``reversed`` with nothing before it, an empty item.

Mapping onto blocks
-------------------
When a spec names k rungs and k != B, :func:`map_onto_blocks` stretches (k < B) or
sub-samples (k > B) them evenly along depth, keeping their order::

    block i <- rungs[round_half_up(i * (k - 1) / (B - 1))]

so block 0 always gets the first named rung and block B-1 the last one. k == 1 gives every
block that rung. B == 1 gives the single block the *last* named rung, because the last block
of the trained mapping reads the deepest rung (``default`` with B == 1 is rung R-2).
Rounding is half-up (floor(x + 0.5)), computed exactly in integers, so it never depends on
banker's rounding or float error.

Block weight grammar
--------------------
Case-insensitive, whitespace tolerant. Every block starts at 1.0; an empty spec leaves all at
1.0. A spec is a comma-separated list of items, applied left to right (later items override
earlier ones). Each item is ``[BLOCKS:]VALUE``:

BLOCKS, optional (absent means all blocks)
    ``*`` or ``all``; one block index ``3``; an inclusive range ``0-9`` or ``0..9``
    (``9-0`` is allowed and runs the other way, which matters for ramps).
    Block indices must be 0..B-1; negative block indices are not accepted.
VALUE
    a number ``0.8`` (``1``, ``.5``, ``1e-1`` and negative numbers such as ``-0.5`` are fine;
    a negative weight flips that block's contribution and is allowed on purpose), or
    a linear ramp ``ramp START END`` or ``START->END`` spread over the selected blocks in
    order: the first gets START, the last END, a single block gets START.

Examples: ``0.8``; ``0-9:1.0, 10-19:0.6``; ``*:0.5``; ``ramp 1.0 0.2``; ``1.0->0.2``;
``0.5, 19:1``; ``10-19: 1->0``.

Errors (:class:`LayerSpecError`): NaN or infinite numbers (including overflow like ``1e999``),
a block index outside 0..B-1, a malformed item or number, a ramp without two values, an empty
item.
"""
from __future__ import annotations

import math
import re

from ..errors import LayerSpecError

__all__ = [
    "LAYER_SPEC_SYNTAX",
    "WEIGHT_SPEC_SYNTAX",
    "LayerSpecError",
    "default_rungs",
    "describe_mapping",
    "map_onto_blocks",
    "parse_block_weights",
    "parse_layer_spec",
    "select_rungs",
]

# One-line grammar summaries, appended to syntax errors (and usable as UI tooltips).
LAYER_SPEC_SYNTAX = (
    "comma-separated items, each one of 'default', 'all', 'final', 'last N', an index like 12 "
    "or -1, or a range like 16-35, 35-16, 16..35 or -10..-2; each optionally followed by a "
    "step ':N' or 'every N' (N >= 1) and then 'reversed'; a lone 'reversed' item reverses "
    "everything before it; empty spec = default"
)
WEIGHT_SPEC_SYNTAX = (
    "comma-separated items '[BLOCKS:]VALUE'; BLOCKS is '*', 'all', an index like 3 or a range "
    "like 0-9 / 0..9; VALUE is a finite number like 0.8 or a ramp 'ramp 1.0 0.2' / '1.0->0.2'; "
    "later items override earlier ones, blocks not mentioned keep 1.0"
)

# Numbers are ASCII only: Python's int()/float() would accept other scripts' digits.
_INT = r"[+-]?[0-9]+"
_INT_RE = re.compile(_INT)
_RANGE_RE = re.compile(rf"({_INT})\s*(?:\.\.|-)\s*({_INT})")
_LAST_RE = re.compile(r"last\s*(.*)")
# Modifiers are peeled off the end of an item: first 'reversed', then the step.
_REVERSE_RE = re.compile(r"(.*?)\s*\breversed?")
_STEP_RE = re.compile(r"(.*?)\s*(?::(.*)|\bevery\b(.*))")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?")
_NON_FINITE_WORDS = {"nan", "inf", "infinity"}
_RAMP_WORD_RE = re.compile(r"ramp\b\s*(.*)")
_RAMP_ARROW_RE = re.compile(r"(.*?)\s*->\s*(.*)")

_ECHO_LIMIT = 200  # a pasted novel should not flood the ComfyUI error popup


# --------------------------------------------------------------------------- shared helpers


def _echo(spec: object) -> str:
    """repr() of the spec, shortened so huge inputs still give a readable message."""
    text = repr(spec)
    if len(text) > _ECHO_LIMIT:
        text = text[: _ECHO_LIMIT - 5] + "...'"
    return text


def _layer_error(spec: object, problem: str, hint: str | None = None) -> LayerSpecError:
    hint = hint if hint is not None else f"Valid syntax: {LAYER_SPEC_SYNTAX}."
    return LayerSpecError(f"Invalid layer spec {_echo(spec)}: {problem}. {hint}")


def _weight_error(spec: object, problem: str, hint: str | None = None) -> LayerSpecError:
    hint = hint if hint is not None else f"Valid syntax: {WEIGHT_SPEC_SYNTAX}."
    return LayerSpecError(f"Invalid block-weight spec {_echo(spec)}: {problem}. {hint}")


def _rung_range_hint(num_rungs: int) -> str:
    return (
        f"Valid rungs are 0..{num_rungs - 1} (or -{num_rungs}..-1 counting back from the end; "
        f"rung {num_rungs - 1} is the final-norm output)."
    )


def _block_range_hint(num_blocks: int) -> str:
    return f"Valid blocks are 0..{num_blocks - 1}."


def _check_count(value: object, name: str, minimum: int) -> int:
    """Model sizes come from code, not users, but a clear error beats an IndexError later."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LayerSpecError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return value


def _check_spec_is_text(spec: object, make_error) -> str:
    if not isinstance(spec, str):
        raise make_error(spec, f"expected a string, got {type(spec).__name__}")
    return spec


def _items(spec: str) -> list[str]:
    """Split on commas and normalise case and whitespace; [] for a blank spec."""
    if not spec.strip():
        return []
    return [" ".join(raw.lower().split()) for raw in spec.split(",")]


def _to_int(text: str, spec: str, what: str, make_error) -> int:
    """int() of an already-validated digit string; int() refuses > 4300 digits."""
    try:
        return int(text)
    except ValueError:
        raise make_error(spec, f"{what} {text[:20]!r}... is far too long a number") from None


def _inclusive_range(first: int, last: int) -> list[int]:
    """first..last inclusive, descending when first > last."""
    direction = 1 if last >= first else -1
    return list(range(first, last + direction, direction))


# --------------------------------------------------------------------------- layer spec


def _default_problem(num_rungs: int, num_blocks: int) -> str:
    return (
        f"the default mapping needs {num_blocks} rungs before the final norm but the model has "
        f"only {num_rungs - 1} (rungs 0..{num_rungs - 2})"
    )


def default_rungs(num_rungs: int, num_blocks: int) -> list[int]:
    """The trained mapping: block i reads rung R-1-B+i, i.e. rungs R-1-B .. R-2.

    Raises LayerSpecError when B > R-1 (there are not enough rungs before the final norm).
    """
    _check_count(num_rungs, "num_rungs", 1)
    _check_count(num_blocks, "num_blocks", 1)
    first = num_rungs - 1 - num_blocks
    if first < 0:
        raise LayerSpecError(
            f"{_default_problem(num_rungs, num_blocks)}. Valid: num_blocks 1..{num_rungs - 1}."
        )
    return list(range(first, num_rungs - 1))


def _resolve_rung(index: int, num_rungs: int, spec: str) -> int:
    """Python-style index -> rung number, or an error showing the valid range."""
    if -num_rungs <= index < num_rungs:
        return index % num_rungs
    raise _layer_error(spec, f"rung {index} is out of range", _rung_range_hint(num_rungs))


def _parse_step(text: str, spec: str) -> int:
    if not text:
        raise _layer_error(spec, "':' or 'every' must be followed by a step, like 16-35:2")
    if not _INT_RE.fullmatch(text):
        raise _layer_error(spec, f"step {text!r} is not a whole number")
    step = _to_int(text, spec, "step", _layer_error)
    if step <= 0:
        raise _layer_error(
            spec,
            f"step {step} is not allowed",
            "A step must be a whole number >= 1 (1, 2, 3, ...).",
        )
    return step


def _split_modifiers(item: str, spec: str) -> tuple[str, int | None, bool]:
    """'16-35:2 reversed' -> ('16-35', 2, True). Modifiers must come in that order."""
    reverse = False
    match = _REVERSE_RE.fullmatch(item)
    if match:
        item, reverse = match.group(1), True
    step = None
    match = _STEP_RE.fullmatch(item)
    if match:
        item = match.group(1)
        step_text = match.group(2) if match.group(2) is not None else match.group(3)
        step = _parse_step(step_text.strip(), spec)
    return item.strip(), step, reverse


def _select_last(count_text: str, spec: str, num_rungs: int) -> list[int]:
    """'last N' -> the N rungs before the final norm."""
    valid = (
        f"N must be 1..{num_rungs - 1}: the model has {num_rungs - 1} rungs before the final norm."
    )
    if not count_text:
        raise _layer_error(spec, "'last' needs a count, like 'last 20'", valid)
    if not _INT_RE.fullmatch(count_text):
        raise _layer_error(spec, f"'last {count_text}' needs a whole-number count", valid)
    count = _to_int(count_text, spec, "count", _layer_error)
    if not 1 <= count <= num_rungs - 1:
        raise _layer_error(spec, f"'last {count}' is out of range", valid)
    return list(range(num_rungs - 1 - count, num_rungs - 1))


def _select_item(selector: str, spec: str, num_rungs: int, num_blocks: int) -> list[int]:
    """The rungs one SELECTOR names (before step and 'reversed')."""
    if selector == "default":
        if num_blocks > num_rungs - 1:
            raise _layer_error(
                spec,
                _default_problem(num_rungs, num_blocks),
                f"Name the rungs explicitly instead, e.g. 'all'. {_rung_range_hint(num_rungs)}",
            )
        return default_rungs(num_rungs, num_blocks)
    if selector == "all":
        return list(range(num_rungs))
    if selector == "final":
        return [num_rungs - 1]
    match = _LAST_RE.fullmatch(selector)
    if match:
        return _select_last(match.group(1).strip(), spec, num_rungs)
    if _INT_RE.fullmatch(selector):
        index = _to_int(selector, spec, "rung", _layer_error)
        return [_resolve_rung(index, num_rungs, spec)]
    match = _RANGE_RE.fullmatch(selector)
    if match:
        first, last = (
            _resolve_rung(_to_int(end, spec, "rung", _layer_error), num_rungs, spec)
            for end in match.groups()
        )
        return _inclusive_range(first, last)
    if "reverse" in selector:
        raise _layer_error(
            spec,
            f"{selector!r} is not a valid item "
            "(write the step before 'reversed', like 16-35:2 reversed)",
        )
    raise _layer_error(spec, f"{selector!r} is not a valid item")


def select_rungs(spec: str, num_rungs: int, num_blocks: int) -> list[int]:
    """The rungs a layer spec names, in order, before they are mapped onto blocks.

    Useful to report or inspect what a spec means. The result may be longer or shorter than
    num_blocks and may repeat rungs; every entry is within 0..num_rungs-1. See the module
    docstring for the grammar. Raises LayerSpecError on any problem.
    """
    _check_count(num_rungs, "num_rungs", 1)
    _check_count(num_blocks, "num_blocks", 1)
    spec = _check_spec_is_text(spec, _layer_error)
    items = _items(spec) or ["default"]
    rungs: list[int] = []
    for item in items:
        if not item:
            raise _layer_error(spec, "it has an empty item (two commas in a row or a stray comma)")
        selector, step, reverse = _split_modifiers(item, spec)
        if not selector:
            if step is not None:
                raise _layer_error(spec, f"the step in {item!r} has no range before it")
            # A lone 'reversed' reverses everything so far, so whole lists can be flipped.
            if not rungs:
                raise _layer_error(
                    spec,
                    "'reversed' has nothing before it to reverse (write e.g. 'default reversed')",
                )
            rungs.reverse()
            continue
        picked = _select_item(selector, spec, num_rungs, num_blocks)
        if step is not None:
            picked = picked[::step]
        if reverse:
            picked.reverse()
        rungs.extend(picked)
    if not rungs:  # every item yields >= 1 rung today; kept so a future keyword cannot slip by
        raise _layer_error(spec, "it selects no rungs")
    return rungs


def _stretch_index(block: int, num_picked: int, num_blocks: int) -> int:
    """round_half_up(block * (k-1) / (B-1)) exactly: floor(p/q + 1/2) == (2p + q) // (2q)."""
    p = block * (num_picked - 1)
    q = num_blocks - 1
    return (2 * p + q) // (2 * q)


def map_onto_blocks(rungs: list[int], num_blocks: int) -> list[int]:
    """Map k named rungs onto B blocks, evenly along depth and keeping their order.

    Block i takes ``rungs[round_half_up(i * (k-1) / (B-1))]``: block 0 gets the first rung,
    block B-1 the last, and the rest are stretched (k < B, rungs repeat) or sub-sampled
    (k > B, rungs are skipped). k == B is the identity; k == 1 gives every block that rung.
    B == 1 gives the single block ``rungs[-1]``, matching the trained mapping, whose last
    block reads the deepest rung.
    """
    _check_count(num_blocks, "num_blocks", 1)
    if not rungs:
        raise LayerSpecError(
            "there are no rungs to map onto blocks; a spec must name at least one rung."
        )
    if num_blocks == 1:
        return [rungs[-1]]
    return [rungs[_stretch_index(i, len(rungs), num_blocks)] for i in range(num_blocks)]


def parse_layer_spec(spec: str, num_rungs: int, num_blocks: int) -> list[int]:
    """The rung that feeds each DiT block: a list of exactly num_blocks ints in 0..num_rungs-1.

    ``select_rungs`` followed by ``map_onto_blocks``; see the module docstring for the
    grammar and the mapping rule. Raises LayerSpecError on any problem.
    """
    return map_onto_blocks(select_rungs(spec, num_rungs, num_blocks), num_blocks)


# --------------------------------------------------------------------------- block weights


def _parse_weight(text: str, spec: str) -> float:
    """One finite float; NaN/inf are refused because they would poison the whole image."""
    if text.lstrip("+-") in _NON_FINITE_WORDS:
        raise _weight_error(
            spec, f"weight {text!r} is not finite", "Weights must be finite numbers."
        )
    if not _FLOAT_RE.fullmatch(text):
        if not text:
            raise _weight_error(spec, "a weight value is missing")
        raise _weight_error(spec, f"{text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise _weight_error(
            spec, f"weight {text!r} overflows to {value}", "Weights must be finite numbers."
        )
    return value


def _check_block(index_text: str, spec: str, num_blocks: int) -> int:
    index = _to_int(index_text, spec, "block", _weight_error)
    if not 0 <= index < num_blocks:
        raise _weight_error(spec, f"block {index} is out of range", _block_range_hint(num_blocks))
    return index


def _select_blocks(text: str, spec: str, num_blocks: int) -> list[int]:
    """The blocks a BLOCKS selector names, in the order written (it matters for ramps)."""
    if text in ("*", "all"):
        return list(range(num_blocks))
    if _INT_RE.fullmatch(text):
        return [_check_block(text, spec, num_blocks)]
    match = _RANGE_RE.fullmatch(text)
    if match:
        first, last = (_check_block(end, spec, num_blocks) for end in match.groups())
        return _inclusive_range(first, last)
    if not text:
        raise _weight_error(spec, "a block selector is missing before ':'")
    raise _weight_error(
        spec,
        f"{text!r} is not a block selector",
        f"{_block_range_hint(num_blocks)} Valid syntax: {WEIGHT_SPEC_SYNTAX}.",
    )


def _ramp_ends(text: str, spec: str) -> tuple[str, str] | None:
    """('1.0', '0.2') for 'ramp 1.0 0.2' or '1.0->0.2'; None when text is not a ramp."""
    match = _RAMP_WORD_RE.fullmatch(text)
    if match:
        ends = match.group(1).split()
        if len(ends) != 2:
            raise _weight_error(spec, f"{text!r} needs exactly two values, like 'ramp 1.0 0.2'")
        return ends[0], ends[1]
    match = _RAMP_ARROW_RE.fullmatch(text)
    if match:
        return match.group(1), match.group(2)
    return None


def _weight_values(text: str, count: int, spec: str) -> list[float]:
    """The weights VALUE gives to `count` selected blocks: a constant or a linear ramp."""
    ends = _ramp_ends(text, spec)
    if ends is None:
        if _RANGE_RE.fullmatch(text):  # a common slip: '0-9' meant as blocks, weight forgotten
            raise _weight_error(spec, f"blocks {text!r} have no weight; write e.g. '{text}:0.6'")
        return [_parse_weight(text, spec)] * count
    start, end = (_parse_weight(value, spec) for value in ends)
    if count == 1:
        return [start]
    # start*(1-t) + end*t (not start + (end-start)*t): exact at both ends, no overflow of end-start.
    return [start * (1 - i / (count - 1)) + end * (i / (count - 1)) for i in range(count)]


def parse_block_weights(spec: str, num_blocks: int) -> list[float]:
    """Per-block strength multipliers: a list of exactly num_blocks finite floats.

    Blocks start at 1.0; items apply left to right. See the module docstring for the grammar.
    Negative weights are allowed; NaN and infinity are not. Raises LayerSpecError.
    """
    _check_count(num_blocks, "num_blocks", 1)
    spec = _check_spec_is_text(spec, _weight_error)
    weights = [1.0] * num_blocks
    for item in _items(spec):
        if not item:
            raise _weight_error(spec, "it has an empty item (two commas in a row or a stray comma)")
        # BLOCKS never contains ':', so the first ':' ends it; no ':' means all blocks.
        blocks_text, _, value_text = item.partition(":") if ":" in item else ("*", "", item)
        blocks = _select_blocks(blocks_text.strip(), spec, num_blocks)
        for block, value in zip(blocks, _weight_values(value_text.strip(), len(blocks), spec)):
            weights[block] = value
    # Ramp ends within float range stay finite, but rounding at the very edge of that range
    # (ends near 1.8e308) could still overflow, so check the result rather than trust it.
    if not all(math.isfinite(w) for w in weights):
        raise _weight_error(
            spec, "a ramp overflows the float range", "Weights must be finite numbers."
        )
    return weights


# --------------------------------------------------------------------------- description


def _runs(mapping: list[int]) -> list[tuple[int, int]]:
    """Split block indices into (first, last) runs whose rungs change by a constant step."""
    runs = []
    start = 0
    while start < len(mapping):
        end = start
        if start + 1 < len(mapping):
            delta = mapping[start + 1] - mapping[start]
            end = start + 1
            while end + 1 < len(mapping) and mapping[end + 1] - mapping[end] == delta:
                end += 1
            # Two rungs far apart are two separate picks, not a stepped range.
            if end == start + 1 and abs(delta) > 1:
                end = start
        runs.append((start, end))
        start = end + 1
    return runs


def _rung_label(rung: int, num_rungs: int) -> str:
    if rung == num_rungs - 1:
        return " (final norm)"
    if rung == 0:
        return " (embeddings)"
    return ""


def describe_mapping(mapping: list[int], num_rungs: int) -> str:
    """Short human summary of a block -> rung mapping, e.g. 'blocks 0-19 <- rungs 16-35'.

    Runs are joined by '; '. A stepped run is written like the spec grammar
    ('rungs 16-34:2'); a run of blocks sharing one rung reads 'blocks 0-3 <- rung 36 (final norm)'.
    """
    _check_count(num_rungs, "num_rungs", 1)
    if not mapping:
        return "no blocks"
    for rung in mapping:
        if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung < num_rungs:
            raise LayerSpecError(
                f"Invalid mapping {_echo(mapping)}: rung {rung!r} is not a rung index. "
                f"Valid rungs are 0..{num_rungs - 1}."
            )
    parts = []
    for first, last in _runs(mapping):
        blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
        low, high = mapping[first], mapping[last]
        if low == high:
            rungs = f"rung {low}{_rung_label(low, num_rungs)}"
        else:
            step = abs(mapping[first + 1] - low)
            rungs = f"rungs {low}-{high}" + (f":{step}" if step > 1 else "")
        parts.append(f"{blocks} <- {rungs}")
    return "; ".join(parts)
