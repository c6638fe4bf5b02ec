"""Hypothesis strategies shared by the spec grammar tests (layer specs, block weights, mixes)."""
from __future__ import annotations

from hypothesis import strategies as st

# Fragments of the grammars, so random text often gets deep into the parsers.
FRAGMENTS = st.sampled_from(
    [
        "default", "all", "final", "last", "every", "reversed", "reverse", "ramp", "*", "nan",
        "inf", "e", "->", "-", "..", ".", ":", ",", " ", "+", "0", "1", "2", "7", "19", "36",
        "99", "-1", "1e999", "\u0663", "\t",
    ]
)
SPEC_TEXT = st.one_of(st.text(max_size=40), st.lists(FRAGMENTS, max_size=12).map("".join))


def inclusive(first, last):
    """first..last inclusive, written independently of the parsers."""
    step = 1 if last >= first else -1
    return list(range(first, last + step, step))
