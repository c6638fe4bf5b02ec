"""Tests of tbac_core.ladder.block_spec: the per-block grammar of block weights and mix shares."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_strategies import SPEC_TEXT, inclusive

from tbac_core.ladder.block_spec import parse_block_weights, parse_mix_spec
from tbac_core.ladder.layer_spec import LayerSpecError

# ----------------------------------------------------------------------------- block weights

RAMP_20 = [1.0 - 0.8 * i / 19 for i in range(20)]

WEIGHT_CASES = [
    # spec, num_blocks, expected weights
    ("", 20, [1.0] * 20),
    ("  ", 20, [1.0] * 20),
    ("0.8", 20, [0.8] * 20),
    (" 0.8 ", 20, [0.8] * 20),
    ("1", 20, [1.0] * 20),
    (".5", 20, [0.5] * 20),
    ("2.", 20, [2.0] * 20),
    ("1e-1", 20, [0.1] * 20),
    ("1E-1", 20, [0.1] * 20),
    ("-0.5", 20, [-0.5] * 20),  # negative weights are allowed
    ("+0.5", 20, [0.5] * 20),
    ("0-9:1.0, 10-19:0.6", 20, [1.0] * 10 + [0.6] * 10),
    ("10-19:0.6", 20, [1.0] * 10 + [0.6] * 10),
    ("10..19 : 0.6", 20, [1.0] * 10 + [0.6] * 10),
    ("19-10:0.6", 20, [1.0] * 10 + [0.6] * 10),
    ("*:0.5", 20, [0.5] * 20),
    ("all:0.5", 20, [0.5] * 20),
    ("ALL : 0.5", 20, [0.5] * 20),
    ("3:0", 20, [1.0] * 3 + [0.0] + [1.0] * 16),
    ("0.5, 3:2", 20, [0.5] * 3 + [2.0] + [0.5] * 16),  # later items override earlier ones
    ("3:2, 0.5", 20, [0.5] * 20),
    ("0-9:0.2, 5-14:0.7", 20, [0.2] * 5 + [0.7] * 10 + [1.0] * 5),
    ("ramp 1.0 0.2", 20, RAMP_20),
    ("RAMP  1.0   0.2", 20, RAMP_20),
    ("1.0->0.2", 20, RAMP_20),
    ("1.0 -> 0.2", 20, RAMP_20),
    ("*:1.0->0.2", 20, RAMP_20),
    ("ramp 1 0.4", 4, [1.0, 0.8, 0.6, 0.4]),
    ("-1->-2", 2, [-1.0, -2.0]),
    ("0-3: ramp 0 1", 6, [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
    ("3-0:0->1", 4, [1.0, 2 / 3, 1 / 3, 0.0]),  # a descending block range runs the ramp backwards
    ("5:0->1", 6, [1.0] * 5 + [0.0]),  # one block gets the start value
    ("ramp 1 0", 1, [1.0]),
    ("0.3", 1, [0.3]),
    ("1e308->-1e308", 3, [1e308, 0.0, -1e308]),  # no overflow from end - start
]


@pytest.mark.parametrize("spec, num_blocks, expected", WEIGHT_CASES)
def test_parse_block_weights(spec, num_blocks, expected):
    assert parse_block_weights(spec, num_blocks) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_ramp_ends_are_exact():
    weights = parse_block_weights("0.1->0.7", 20)
    assert weights[0] == 0.1 and weights[-1] == 0.7


@pytest.mark.parametrize("spec", ["ramp 5e-324 5e-324", "5e-324->1e-323", "-5e-324->5e-324", "1e308->-1e308"])
def test_ramp_values_stay_between_its_ends(spec):
    """Subnormal ends: start*(1-u) + end*u rounds both products to 0 (found by hypothesis in CI)."""
    weights = parse_block_weights(spec, 5)
    low, high = min(weights[0], weights[-1]), max(weights[0], weights[-1])
    assert all(math.isfinite(w) and low <= w <= high for w in weights), weights
    if weights[0] == weights[-1]:
        assert len(set(weights)) == 1


WEIGHT_SYNTAX = "Valid syntax"
WEIGHT_ERROR_CASES = [
    # spec, num_blocks, fragments the message must contain (besides the echoed spec)
    ("nan", 20, ["not finite", "finite numbers"]),
    ("NaN", 20, ["not finite"]),
    ("inf", 20, ["not finite"]),
    ("-inf", 20, ["not finite"]),
    ("+Infinity", 20, ["not finite"]),
    ("1e999", 20, ["overflows", "finite numbers"]),
    ("0-3:nan", 20, ["not finite"]),
    ("ramp 1 inf", 20, ["not finite"]),
    ("nan->1", 20, ["not finite"]),
    ("20:0.5", 20, ["block 20 is out of range", "0..19"]),
    ("-1:0.5", 20, ["block -1", "0..19"]),
    ("0-25:1", 20, ["block 25", "0..19"]),
    ("4:1", 4, ["block 4", "0..3"]),
    ("abc", 20, ["'abc' is not a number", WEIGHT_SYNTAX]),
    ("0.5.5", 20, ["not a number", WEIGHT_SYNTAX]),
    ("1_000", 20, ["not a number"]),  # float() would accept it; the grammar does not
    ("0-9", 20, ["have no weight", "0-9:0.6"]),
    ("0-9:", 20, ["value is missing", WEIGHT_SYNTAX]),
    (":0.5", 20, ["block selector is missing", WEIGHT_SYNTAX]),
    ("x:0.5", 20, ["'x' is not a block selector", "0..19"]),
    ("0-9:1:2", 20, ["not a number"]),
    ("ramp 1", 20, ["exactly two values"]),
    ("ramp", 20, ["exactly two values"]),
    ("ramp 1 2 3", 20, ["exactly two values"]),
    ("1->", 20, ["value is missing"]),
    ("->1", 20, ["value is missing"]),
    ("1,,2", 20, ["empty item"]),
    ("0.5,", 20, ["empty item"]),
    ("1" * 5000 + ":1", 20, ["too long"]),
]


@pytest.mark.parametrize("spec, num_blocks, fragments", WEIGHT_ERROR_CASES)
def test_block_weight_errors(spec, num_blocks, fragments):
    with pytest.raises(LayerSpecError) as caught:
        parse_block_weights(spec, num_blocks)
    message = str(caught.value)
    assert repr(spec)[:100] in message, "the message must echo the spec"
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("spec", [None, 0.8])
def test_block_weights_must_be_text(spec):
    with pytest.raises(LayerSpecError, match="expected a string"):
        parse_block_weights(spec, 20)


def _weight_text(value: float) -> str:
    return repr(value)  # repr round-trips exactly and may use exponents such as 1e-05


@st.composite
def weight_specs(draw):
    """(spec, num_blocks, per-block expectation) where an expectation is a float or (lo, hi)."""
    num_blocks = draw(st.integers(1, 40))
    expected: list = [1.0] * num_blocks
    values = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
    texts = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["none", "*", "all", "index", "range"]))
        if kind == "index":
            block = draw(st.integers(0, num_blocks - 1))
            prefix, blocks = f"{block}:", [block]
        elif kind == "range":
            ends = st.integers(0, num_blocks - 1)
            first, last = draw(ends), draw(ends)
            sep = draw(st.sampled_from(["-", "..", " - "]))
            prefix, blocks = f"{first}{sep}{last} : ", inclusive(first, last)
        else:
            prefix = "" if kind == "none" else f"{kind}:"
            blocks = list(range(num_blocks))
        start = draw(values)
        if draw(st.booleans()):
            value_text = _weight_text(start)
            for block in blocks:
                expected[block] = start
        else:
            end = draw(values)
            value_text = draw(
                st.sampled_from(
                    [
                        f"ramp {_weight_text(start)} {_weight_text(end)}",
                        f"{_weight_text(start)}->{_weight_text(end)}",
                        f"{_weight_text(start)} -> {_weight_text(end)}",
                    ]
                )
            )
            for block in blocks:
                expected[block] = (min(start, end), max(start, end))
            expected[blocks[0]] = start
            if len(blocks) > 1:
                expected[blocks[-1]] = end
        texts.append(draw(st.sampled_from([str.lower, str.upper]))(prefix + value_text))
    return ", ".join(texts), num_blocks, expected


@settings(max_examples=300)
@given(weight_specs())
def test_valid_weight_specs(case):
    spec, num_blocks, expected = case
    weights = parse_block_weights(spec, num_blocks)
    assert len(weights) == num_blocks
    for weight, want in zip(weights, expected):
        assert math.isfinite(weight)
        if isinstance(want, tuple):
            low, high = want
            slack = 1e-12 * max(abs(low), abs(high))
            assert low - slack <= weight <= high + slack
        else:
            assert weight == want


@settings(max_examples=500)
@given(SPEC_TEXT, st.integers(1, 40))
def test_any_text_gives_finite_weights_or_raises_layer_spec_error(spec, num_blocks):
    try:
        weights = parse_block_weights(spec, num_blocks)
    except LayerSpecError as error:
        assert str(error)
        return
    assert len(weights) == num_blocks
    assert all(type(w) is float and math.isfinite(w) for w in weights)


# -- mix spec ----------------------------------------------------------------------------------
T = 1 / 3
VALID_MIX_SPECS = [
    ("a", 4, [0, 0, 0, 0]),
    ("B", 4, [1, 1, 1, 1]),
    ("fade", 4, [0, T, 2 * T, 1]),
    ("a->b", 4, [0, T, 2 * T, 1]),
    ("b->a", 4, [1, 2 * T, T, 0]),
    ("0-1:a, 2-3:b", 4, [0, 0, 1, 1]),
    ("0..1 : b", 4, [1, 1, 0, 0]),
    ("aabb", 4, [0, 0, 1, 1]),
    (" a b A b ", 4, [0, 1, 0, 1]),
    ("fade 1-4", 6, [0, 0, 1 / 3, 2 / 3, 1, 1]),
    ("fade 2..2", 4, [0, 0, 0, 1]),
    ("0.25", 4, [0.25] * 4),
    ("all: .5", 4, [0.5] * 4),
    ("1e-1", 4, [0.1] * 4),
    ("3-0:fade", 4, [1, 2 * T, T, 0]),
    ("*:0->0.5", 4, [0, 1 / 6, 1 / 3, 0.5]),
    ("b, 0:a", 4, [0, 1, 1, 1]),
    ("2:0.5->1", 4, [0, 0, 0.5, 0]),
    ("FADE", 1, [0]),
    ("b", 1, [1]),
    ("fade, 0-1:b", 4, [1, 1, 2 * T, 1]),
]


@pytest.mark.parametrize("spec, blocks, expected", VALID_MIX_SPECS)
def test_mix_spec_parses(spec, blocks, expected):
    assert parse_mix_spec(spec, blocks) == pytest.approx(expected, abs=1e-12)


def test_mix_spec_fades_end_exactly_on_a_and_b():
    shares = parse_mix_spec("fade", 20)
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares == sorted(shares)


MALFORMED_MIX_SPECS = [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("a,,b", "empty item"),
    ("a,", "empty item"),
    ("c", "'c' is not 'a', 'b' or a number"),
    ("0-4:a", "block 4 is out of range"),
    ("-1:a", "block -1 is out of range"),
    ("0-3", "'0-3' is not 'a', 'b' or a number"),
    ("0-3:", "a value is missing"),
    (":a", "block selector is missing"),
    ("x:a", "'x' is not a block selector"),
    ("0-1-2:a", "is not a block selector"),
    ("1.5", "share 1.5 is outside 0..1"),
    ("-0.5", "share -0.5 is outside 0..1"),
    ("1e999", "outside 0..1"),
    ("nan", "not 'a', 'b' or a number"),
    ("inf", "not 'a', 'b' or a number"),
    ("aab", "names 3 blocks but the DiT has 4"),
    ("aabba", "names 5 blocks"),
    ("fade 3-1", "runs backwards"),
    ("fade x", "'fade' needs two blocks"),
    ("fade 0-9", "block 9 is out of range"),
    ("0-1:b->", "needs a value on each side of '->'"),
    ("->b", "needs a value on each side of '->'"),
    ("a->b->a", "'b->a' is not"),
    ("a->c", "'c' is not"),
    ("0-1:a:b", "is not 'a', 'b' or a number"),
    ("9" * 40 + ":a", "out of range"),
]


@pytest.mark.parametrize("spec, message", MALFORMED_MIX_SPECS)
def test_mix_spec_refuses_malformed_input(spec, message):
    with pytest.raises(LayerSpecError) as caught:
        parse_mix_spec(spec, 4)
    text = str(caught.value)
    assert text.startswith("Invalid mix spec") and message in text


def test_mix_spec_refuses_non_text_and_bad_block_counts():
    with pytest.raises(LayerSpecError, match="expected a string"):
        parse_mix_spec(None, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        parse_mix_spec("a", 0)
