"""Parse the user-facing *layer spec* of TBAC-UniImage: which MLLM rung feeds each DiT block.

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

Per-block weights and mixes have their own grammar: ``tbac_core.ladder.block_spec``.
"""
from __future__ import annotations

import re

from ..errors import LayerSpecError
from .text import (
    EMPTY_ITEM,
    INT_RE,
    RANGE_RE,
    check_count,
    check_text,
    echo,
    inclusive_range,
    parse_int,
    spec_error,
    split_items,
)

__all__ = [
    "LAYER_SPEC_SYNTAX",
    "LayerSpecError",
    "default_rungs",
    "describe_mapping",
    "map_onto_blocks",
    "parse_layer_spec",
    "select_rungs",
]

# One-line grammar summary, appended to syntax errors (and usable as a UI tooltip).
LAYER_SPEC_SYNTAX = (
    "comma-separated items, each one of 'default', 'all', 'final', 'last N', an index like 12 "
    "or -1, or a range like 16-35, 35-16, 16..35 or -10..-2; each optionally followed by a "
    "step ':N' or 'every N' (N >= 1) and then 'reversed'; a lone 'reversed' item reverses "
    "everything before it; empty spec = default"
)

_LAST_RE = re.compile(r"last\s*(.*)")
# Modifiers are peeled off the end of an item: first 'reversed', then the step.
_REVERSE_RE = re.compile(r"(.*?)\s*\breversed?")
_STEP_RE = re.compile(r"(.*?)\s*(?::(.*)|\bevery\b(.*))")

_layer_error = spec_error("layer", LAYER_SPEC_SYNTAX)


def _rung_range_hint(num_rungs: int) -> str:
    return (
        f"Valid rungs are 0..{num_rungs - 1} (or -{num_rungs}..-1 counting back from the end; "
        f"rung {num_rungs - 1} is the final-norm output)."
    )


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
    check_count(num_rungs, "num_rungs", 1)
    check_count(num_blocks, "num_blocks", 1)
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
    if not INT_RE.fullmatch(text):
        raise _layer_error(spec, f"step {text!r} is not a whole number")
    step = parse_int(text, spec, "step", _layer_error)
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
    if not INT_RE.fullmatch(count_text):
        raise _layer_error(spec, f"'last {count_text}' needs a whole-number count", valid)
    count = parse_int(count_text, spec, "count", _layer_error)
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
    if INT_RE.fullmatch(selector):
        index = parse_int(selector, spec, "rung", _layer_error)
        return [_resolve_rung(index, num_rungs, spec)]
    match = RANGE_RE.fullmatch(selector)
    if match:
        first, last = (
            _resolve_rung(parse_int(end, spec, "rung", _layer_error), num_rungs, spec)
            for end in match.groups()
        )
        return inclusive_range(first, last)
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
    check_count(num_rungs, "num_rungs", 1)
    check_count(num_blocks, "num_blocks", 1)
    spec = check_text(spec, _layer_error)
    items = split_items(spec) or ["default"]
    rungs: list[int] = []
    for item in items:
        if not item:
            raise _layer_error(spec, EMPTY_ITEM)
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
    check_count(num_blocks, "num_blocks", 1)
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
    check_count(num_rungs, "num_rungs", 1)
    if not mapping:
        return "no blocks"
    for rung in mapping:
        if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung < num_rungs:
            raise LayerSpecError(
                f"Invalid mapping {echo(mapping)}: rung {rung!r} is not a rung index. "
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
