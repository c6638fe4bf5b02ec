"""Tests of tbac_core.ladder.layer_spec: layer specs, block mapping, descriptions.

Two model shapes are used throughout: the real TBAC-UniImage (37 rungs, 20 DiT blocks) and
the tiny test fixture (7 rungs, 4 blocks).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_strategies import SPEC_TEXT, inclusive

from tbac_core.ladder.layer_spec import (
    LayerSpecError,
    default_rungs,
    describe_mapping,
    map_onto_blocks,
    parse_layer_spec,
    select_rungs,
)

REAL = (37, 20)  # (num_rungs, num_blocks)
TINY = (7, 4)
REAL_DEFAULT = list(range(16, 36))
TINY_DEFAULT = [2, 3, 4, 5]


# ----------------------------------------------------------------------------- default_rungs


@pytest.mark.parametrize(
    "num_rungs, num_blocks, expected",
    [
        (37, 20, REAL_DEFAULT),
        (7, 4, TINY_DEFAULT),
        (7, 1, [5]),
        (7, 6, [0, 1, 2, 3, 4, 5]),  # B == R-1 uses every rung before the final norm
        (2, 1, [0]),
    ],
)
def test_default_rungs(num_rungs, num_blocks, expected):
    assert default_rungs(num_rungs, num_blocks) == expected


@pytest.mark.parametrize("num_rungs, num_blocks", [(7, 7), (37, 37), (1, 1), (7, 50)])
def test_default_rungs_needs_enough_rungs(num_rungs, num_blocks):
    with pytest.raises(LayerSpecError, match=rf"num_blocks 1\.\.{num_rungs - 1}"):
        default_rungs(num_rungs, num_blocks)


@pytest.mark.parametrize("num_rungs, num_blocks", [(0, 4), (7, 0), (-3, 4), (7.0, 4), (True, 1)])
def test_bad_model_sizes_raise_layer_spec_error(num_rungs, num_blocks):
    with pytest.raises(LayerSpecError, match="must be a whole number"):
        select_rungs("default", num_rungs, num_blocks)


# ----------------------------------------------------------------------------- select_rungs

SELECT_CASES = [
    # spec, (R, B), rungs named before mapping
    ("", REAL, REAL_DEFAULT),
    ("   ", REAL, REAL_DEFAULT),
    ("default", REAL, REAL_DEFAULT),
    ("  DeFaUlT ", REAL, REAL_DEFAULT),
    ("16-35", REAL, REAL_DEFAULT),
    ("16..35", REAL, REAL_DEFAULT),
    ("16 .. 35", REAL, REAL_DEFAULT),
    ("16 - 35", REAL, REAL_DEFAULT),
    ("-21..-2", REAL, REAL_DEFAULT),
    ("-21--2", REAL, REAL_DEFAULT),
    ("-21 - -2", REAL, REAL_DEFAULT),
    ("last 20", REAL, REAL_DEFAULT),
    ("LAST   20", REAL, REAL_DEFAULT),
    ("35-16", REAL, REAL_DEFAULT[::-1]),
    ("35..16", REAL, REAL_DEFAULT[::-1]),
    ("default reversed", REAL, REAL_DEFAULT[::-1]),
    ("16-35 reverse", REAL, REAL_DEFAULT[::-1]),
    ("16-35 REVERSED", REAL, REAL_DEFAULT[::-1]),
    ("all", REAL, list(range(37))),
    ("final", REAL, [36]),
    ("-1", REAL, [36]),
    ("-2", REAL, [35]),
    ("-37", REAL, [0]),
    ("12", REAL, [12]),
    ("+12", REAL, [12]),
    ("0", REAL, [0]),
    ("16-35:2", REAL, list(range(16, 36, 2))),
    ("16-35 : 2", REAL, list(range(16, 36, 2))),
    ("16-35 every 2", REAL, list(range(16, 36, 2))),
    ("16-35 EVERY 3", REAL, [16, 19, 22, 25, 28, 31, 34]),
    ("16-35:1", REAL, REAL_DEFAULT),
    ("16-35:100", REAL, [16]),
    ("16-35:2 reversed", REAL, list(range(34, 15, -2))),  # step first, then reverse
    ("35-16:2", REAL, list(range(35, 16, -2))),  # a descending range steps from its start
    ("all:4", REAL, [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]),
    ("last 4 every 2", REAL, [32, 34]),
    ("0,4,8,12-15", REAL, [0, 4, 8, 12, 13, 14, 15]),
    (" 0 , 4,8 ,12-15 ", REAL, [0, 4, 8, 12, 13, 14, 15]),
    ("0,4,8, reversed", REAL, [8, 4, 0]),
    ("0,4,reversed,8", REAL, [4, 0, 8]),  # a lone 'reversed' flips only what came before
    ("0-2,reversed,reversed", REAL, [0, 1, 2]),
    ("final,final", REAL, [36, 36]),
    ("-10-2", REAL, list(range(27, 1, -1))),  # '-' after a digit separates: -10 .. 2
    ("5--3", REAL, list(range(5, 35))),  # 5 .. -3 == 5 .. 34
    ("default, final", REAL, REAL_DEFAULT + [36]),
    # tiny fixture
    ("", TINY, TINY_DEFAULT),
    ("default", TINY, TINY_DEFAULT),
    ("last 4", TINY, TINY_DEFAULT),
    ("all", TINY, [0, 1, 2, 3, 4, 5, 6]),
    ("final", TINY, [6]),
    ("-2", TINY, [5]),
    ("-7", TINY, [0]),
    ("1-6:2", TINY, [1, 3, 5]),
    ("0..3", TINY, [0, 1, 2, 3]),
    ("default reversed", TINY, [5, 4, 3, 2]),
    ("-5..-2", TINY, [2, 3, 4, 5]),
    ("last 6", TINY, [0, 1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("spec, shape, expected", SELECT_CASES)
def test_select_rungs(spec, shape, expected):
    assert select_rungs(spec, *shape) == expected


# ----------------------------------------------------------------------------- parse_layer_spec

PARSE_CASES = [
    ("default", REAL, REAL_DEFAULT),
    ("", REAL, REAL_DEFAULT),
    ("last 20", REAL, REAL_DEFAULT),
    ("default reversed", REAL, REAL_DEFAULT[::-1]),
    ("final", REAL, [36] * 20),
    ("-1", REAL, [36] * 20),
    # 37 rungs sub-sampled onto 20 blocks: rungs[round_half_up(i * 36 / 19)]
    ("all", REAL, [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 28, 30, 32, 34, 36]),
    # 10 rungs stretched onto 20 blocks: each rung feeds two neighbouring blocks
    ("16-35:2", REAL, [r for r in range(16, 36, 2) for _ in range(2)]),
    ("16-35 every 2", REAL, [r for r in range(16, 36, 2) for _ in range(2)]),
    (
        "0,4,8,12-15",
        REAL,
        [0, 0, 4, 4, 4, 8, 8, 8, 12, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15, 15],
    ),
    ("default", TINY, TINY_DEFAULT),
    ("all", TINY, [0, 2, 4, 6]),
    ("final", TINY, [6, 6, 6, 6]),
    ("-2", TINY, [5, 5, 5, 5]),
    ("1-6:2", TINY, [1, 3, 3, 5]),  # i*2/3 = 0, .67, 1.33, 2 -> 0, 1, 1, 2
    ("default reversed", TINY, [5, 4, 3, 2]),
    ("0..3", TINY, [0, 1, 2, 3]),
    ("0,6", TINY, [0, 0, 6, 6]),  # i/3 = 0, .33, .67, 1 -> 0, 0, 1, 1
    ("default", (7, 1), [5]),  # B == 1: the last named rung
    ("all", (7, 1), [6]),
    ("0-3", (7, 1), [3]),
]


@pytest.mark.parametrize("spec, shape, expected", PARSE_CASES)
def test_parse_layer_spec(spec, shape, expected):
    assert parse_layer_spec(spec, *shape) == expected


# ----------------------------------------------------------------------------- map_onto_blocks


@pytest.mark.parametrize(
    "rungs, num_blocks, expected",
    [
        ([10, 20, 30], 3, [10, 20, 30]),  # k == B: identity
        ([7], 4, [7, 7, 7, 7]),  # k == 1: every block gets it
        ([1, 2, 3], 1, [3]),  # B == 1: the last rung
        # i*2/4 = 0, 0.5, 1, 1.5, 2: half-up gives 0,1,1,2,2; banker's rounding would give 0,0,1,2,2
        ([1, 2, 3], 5, [1, 2, 2, 3, 3]),
        # i*4/2 = 0, 2, 4: sub-sampling keeps both ends and the middle
        ([0, 1, 2, 3, 4], 3, [0, 2, 4]),
        # i*5/2 = 0, 2.5, 5 -> 0, 3, 5 (half-up again)
        ([0, 1, 2, 3, 4, 5], 3, [0, 3, 5]),
        ([5, 4, 3], 6, [5, 5, 4, 4, 3, 3]),  # order is kept, also when descending
        ([9, 9, 1], 3, [9, 9, 1]),  # repeats are fine
    ],
)
def test_map_onto_blocks(rungs, num_blocks, expected):
    assert map_onto_blocks(rungs, num_blocks) == expected


def test_map_onto_blocks_rejects_empty_and_bad_block_count():
    with pytest.raises(LayerSpecError, match="no rungs"):
        map_onto_blocks([], 4)
    with pytest.raises(LayerSpecError, match="num_blocks"):
        map_onto_blocks([1], 0)


# ----------------------------------------------------------------------------- layer spec errors

RANGE_REAL = "0..36"
RANGE_TINY = "0..6"
SYNTAX = "Valid syntax"

LAYER_ERROR_CASES = [
    # spec, (R, B), fragments the message must contain (besides the echoed spec)
    ("37", REAL, ["rung 37 is out of range", RANGE_REAL, "-37..-1"]),
    ("-38", REAL, ["rung -38", RANGE_REAL]),
    ("16-40", REAL, ["rung 40", RANGE_REAL]),
    ("-40..-2", REAL, ["rung -40", RANGE_REAL]),
    ("0,4,99", REAL, ["rung 99", RANGE_REAL]),
    ("7", TINY, ["rung 7", RANGE_TINY]),
    ("0-7", TINY, ["rung 7", RANGE_TINY]),
    ("-8", TINY, ["rung -8", RANGE_TINY]),
    ("16-35:0", REAL, ["step 0", ">= 1"]),
    ("16-35:-2", REAL, ["step -2", ">= 1"]),
    ("16-35 every 0", REAL, ["step 0", ">= 1"]),
    ("16-35:x", REAL, ["step 'x'", SYNTAX]),
    ("16-35:1.5", REAL, ["step '1.5'", SYNTAX]),
    ("16-35:", REAL, ["followed by a step", SYNTAX]),
    ("16-35 every", REAL, ["followed by a step", SYNTAX]),
    (":2", REAL, ["no range before it", SYNTAX]),
    ("foo", REAL, ["'foo' is not a valid item", SYNTAX]),
    ("16-", REAL, ["'16-'", SYNTAX]),
    ("-", REAL, ["'-'", SYNTAX]),
    ("1.5", REAL, ["'1.5'", SYNTAX]),
    ("16...35", REAL, [SYNTAX]),
    ("16-35-40", REAL, [SYNTAX]),
    ("defaults", REAL, [SYNTAX]),
    ("16-35 reversed:2", REAL, ["step before 'reversed'", SYNTAX]),
    ("0,,4", REAL, ["empty item", SYNTAX]),
    ("0,4,", REAL, ["empty item", SYNTAX]),
    (",", REAL, ["empty item", SYNTAX]),
    ("reversed", REAL, ["nothing before it", "default reversed"]),
    ("last 0", REAL, ["last 0", "1..36"]),
    ("last 37", REAL, ["last 37", "1..36"]),
    ("last -3", REAL, ["last -3", "1..36"]),
    ("last", REAL, ["needs a count", "1..36"]),
    ("last x", REAL, ["whole-number count", "1..36"]),
    ("last 7", TINY, ["last 7", "1..6"]),
    ("\u0663", REAL, [SYNTAX]),  # Arabic-Indic digit 3: int() would accept it, we do not
    ("1" * 5000, REAL, ["too long"]),
    ("default", (7, 7), ["needs 7 rungs", "only 6", RANGE_TINY]),
    ("", (37, 40), ["needs 40 rungs", RANGE_REAL]),
]


@pytest.mark.parametrize("spec, shape, fragments", LAYER_ERROR_CASES)
def test_layer_spec_errors(spec, shape, fragments):
    with pytest.raises(LayerSpecError) as caught:
        parse_layer_spec(spec, *shape)
    message = str(caught.value)
    assert repr(spec)[:100] in message, "the message must echo the spec"
    for fragment in fragments:
        assert fragment in message


def test_layer_spec_error_is_a_value_error():
    assert issubclass(LayerSpecError, ValueError)


@pytest.mark.parametrize("spec", [None, 12, ["default"]])
def test_layer_spec_must_be_text(spec):
    with pytest.raises(LayerSpecError, match="expected a string"):
        parse_layer_spec(spec, *REAL)


def test_huge_spec_is_echoed_shortened():
    spec = "0," * 2000 + "99"
    with pytest.raises(LayerSpecError) as caught:
        parse_layer_spec(spec, *REAL)
    assert len(str(caught.value)) < 600
    assert RANGE_REAL in str(caught.value)


# ----------------------------------------------------------------------------- describe_mapping


@pytest.mark.parametrize(
    "mapping, num_rungs, expected",
    [
        (REAL_DEFAULT, 37, "blocks 0-19 <- rungs 16-35"),
        (REAL_DEFAULT[::-1], 37, "blocks 0-19 <- rungs 35-16"),
        (TINY_DEFAULT, 7, "blocks 0-3 <- rungs 2-5"),
        ([36] * 20, 37, "blocks 0-19 <- rung 36 (final norm)"),
        ([0, 0], 7, "blocks 0-1 <- rung 0 (embeddings)"),
        ([0, 2, 4, 6], 7, "blocks 0-3 <- rungs 0-6:2"),
        ([1, 3, 3, 5], 7, "block 0 <- rung 1; blocks 1-2 <- rung 3; block 3 <- rung 5"),
        ([5], 7, "block 0 <- rung 5"),
        ([0, 6], 7, "block 0 <- rung 0 (embeddings); block 1 <- rung 6 (final norm)"),
        ([2, 3, 4, 6], 7, "blocks 0-2 <- rungs 2-4; block 3 <- rung 6 (final norm)"),
        ([], 7, "no blocks"),
    ],
)
def test_describe_mapping(mapping, num_rungs, expected):
    assert describe_mapping(mapping, num_rungs) == expected


@pytest.mark.parametrize("mapping", [[0, 7], [-1], [2.0]])
def test_describe_mapping_rejects_bad_rungs(mapping):
    with pytest.raises(LayerSpecError, match=r"0\.\.6"):
        describe_mapping(mapping, 7)


# ----------------------------------------------------------------------------- properties
# Shapes: any R >= 2 and 1 <= B <= R-1, so 'default' is always valid in generated specs.


@st.composite
def model_shapes(draw):
    num_rungs = draw(st.integers(2, 64))
    return num_rungs, draw(st.integers(1, num_rungs - 1))


@st.composite
def layer_items(draw, num_rungs, num_blocks):
    """One valid item as (text, rungs it names), built independently of the parser."""
    kind = draw(st.sampled_from(["default", "all", "final", "last", "index", "range"]))
    if kind == "default":
        text, rungs = "default", list(range(num_rungs - 1 - num_blocks, num_rungs - 1))
    elif kind == "all":
        text, rungs = "all", list(range(num_rungs))
    elif kind == "final":
        text, rungs = "final", [num_rungs - 1]
    elif kind == "last":
        count = draw(st.integers(1, num_rungs - 1))
        text, rungs = f"last {count}", list(range(num_rungs - 1 - count, num_rungs - 1))
    elif kind == "index":
        index = draw(st.integers(-num_rungs, num_rungs - 1))
        text, rungs = str(index), [index % num_rungs]
    else:
        ends = st.integers(-num_rungs, num_rungs - 1)
        first, last = draw(ends), draw(ends)
        sep = draw(st.sampled_from(["-", "..", " - ", " .. "]))
        text, rungs = f"{first}{sep}{last}", inclusive(first % num_rungs, last % num_rungs)
    if draw(st.booleans()):
        step = draw(st.integers(1, 6))
        text += draw(st.sampled_from([f":{step}", f" : {step}", f" every {step}"]))
        rungs = rungs[::step]
    if draw(st.booleans()):
        text += draw(st.sampled_from([" reversed", " reverse", "  REVERSED"]))
        rungs = rungs[::-1]
    text = draw(st.sampled_from([str.lower, str.upper, str.title]))(text)
    pad = st.sampled_from(["", " ", "  ", "\t"])
    return draw(pad) + text + draw(pad), rungs


@st.composite
def layer_specs(draw):
    """(spec, num_rungs, num_blocks, rungs the spec names)."""
    num_rungs, num_blocks = draw(model_shapes())
    items = draw(st.lists(layer_items(num_rungs, num_blocks), min_size=1, max_size=5))
    texts = [text for text, _ in items]
    rungs = [rung for _, item_rungs in items for rung in item_rungs]
    if draw(st.booleans()):
        texts.append(" reversed")
        rungs.reverse()
    return ",".join(texts), num_rungs, num_blocks, rungs


@settings(max_examples=300)
@given(layer_specs())
def test_valid_specs_map_every_block_to_a_valid_rung(case):
    spec, num_rungs, num_blocks, expected_rungs = case
    assert select_rungs(spec, num_rungs, num_blocks) == expected_rungs
    mapping = parse_layer_spec(spec, num_rungs, num_blocks)
    assert len(mapping) == num_blocks
    assert all(type(rung) is int and 0 <= rung <= num_rungs - 1 for rung in mapping)
    assert mapping == map_onto_blocks(expected_rungs, num_blocks)
    assert "<-" in describe_mapping(mapping, num_rungs)



@settings(max_examples=500)
@given(SPEC_TEXT, st.integers(1, 40), st.integers(1, 40))
def test_any_text_parses_or_raises_layer_spec_error(spec, num_rungs, num_blocks):
    try:
        mapping = parse_layer_spec(spec, num_rungs, num_blocks)
    except LayerSpecError as error:
        assert str(error)
        return
    assert len(mapping) == num_blocks
    assert all(0 <= rung < num_rungs for rung in mapping)
    describe_mapping(mapping, num_rungs)


@given(
    st.lists(st.integers(-1000, 1000), min_size=1, max_size=50),
    st.integers(1, 60),
)
def test_map_onto_blocks_properties(rungs, num_blocks):
    mapping = map_onto_blocks(rungs, num_blocks)
    assert len(mapping) == num_blocks
    assert mapping[-1] == rungs[-1]
    if num_blocks == 1:
        return
    assert mapping[0] == rungs[0]
    # Recover which position each block took: positions never go backwards (order kept) ...
    k = len(rungs)
    positions = [
        (2 * i * (k - 1) + (num_blocks - 1)) // (2 * (num_blocks - 1)) for i in range(num_blocks)
    ]
    assert [rungs[p] for p in positions] == mapping
    assert positions == sorted(positions)
    # ... stretching (k <= B) uses every rung, sub-sampling (k >= B) never repeats one.
    if k <= num_blocks:
        assert set(positions) == set(range(k))
    if k >= num_blocks:
        assert len(set(positions)) == num_blocks
