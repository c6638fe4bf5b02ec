"""Hostile-input property tests: run one call bounded in time and memory, and judge how it ended.

``bounded(call, allowed)`` runs ``call`` in a thread and fails the test when it does not return
within ``timeout_s`` (a hang), when the process's peak memory rose by more than ``max_growth_mb``
while it ran, or when it raised anything but an instance of ``allowed`` (the project's own error
classes) with a non-empty message. It returns the call's result, or the allowed error.
"""
from __future__ import annotations

import resource
import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

TIMEOUT_S = 120  # generous: CI machines are shared; a hang never returns at all
MAX_GROWTH_MB = 1024  # one hostile call on the tiny model may not raise peak memory by more
# Few examples, the same every run: the suite stays fast and a failure reproduces.
HOSTILE = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Ended:
    def __init__(self, result=None, error: BaseException | None = None):
        self.result, self.error = result, error


def bounded(call, allowed: tuple, *, timeout_s: float = TIMEOUT_S, max_growth_mb: float = MAX_GROWTH_MB) -> Ended:
    box: dict = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as exc:  # judged below, in the test's thread
            box["error"] = exc

    before = peak_rss_mb()
    thread = threading.Thread(target=run, daemon=True, name="hostile-call")
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"no answer within {timeout_s} s: a wait without a deadline"
    growth = peak_rss_mb() - before
    assert growth <= max_growth_mb, f"peak memory grew by {growth:.0f} MB (bound {max_growth_mb} MB)"
    error = box.get("error")
    if error is not None:
        assert isinstance(error, allowed), f"raw {type(error).__name__}: {error!r}"
        assert str(error).strip(), f"{type(error).__name__} without a message"
    return Ended(box.get("result"), error)


# -- strategies ------------------------------------------------------------------------------
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
hostile_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.one_of(surrogates, st.characters(max_codepoint=0x7F)), min_size=1, max_size=8),
    st.sampled_from(["\x00", "a\x00b", "../../etc/passwd", "/abs/path", "a/b\\c", "x" * 300, "<|im_end|>",
                     "\ud800", "", " ", "CON", "nul.txt", "é" * 200]),
)
not_text = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.binary(max_size=4), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                                 st.integers(),
                                                                                                 max_size=2))
hostile_seed = st.one_of(st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                         st.text(max_size=3), st.none())
hostile_number = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                           st.booleans(), st.text(max_size=3), st.none())


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_json_value():
    """JSON values of every type, including deep nesting (as text, parsed by the reader under test)."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                       hostile_text)
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=6)
