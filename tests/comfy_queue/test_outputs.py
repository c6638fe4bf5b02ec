"""Output files: atomic writes, distinct local names for distinct outputs."""
from __future__ import annotations

import os

import pytest

import comfy_queue as q
from comfy_queue.outputs import OutputNames, atomic_writer


def test_atomic_write(tmp_path):
    target = tmp_path / "f.png"
    with pytest.raises(TypeError):
        q.atomic_write(str(target), "not bytes")  # fails mid-write
    assert os.listdir(tmp_path) == [], "no target and no temp file left behind"
    q.atomic_write(str(target), b"data")
    assert target.read_bytes() == b"data"


def test_atomic_writer_removes_the_partial_file_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_writer(str(tmp_path / "f.png")) as f:
            f.write(b"half")
            raise RuntimeError("connection lost")
    assert os.listdir(tmp_path) == []


def test_output_names_are_distinct_within_a_row():
    outputs = {
        "a b": {"images": [{"filename": "1.png"}, {"filename": "2.png"}]},
        "a_b": {"images": [{"filename": "3.png"}], "gifs": [{"filename": "4.webp", "type": "temp"}]},
        "n" * 300: {"images": [{"filename": "5.x/../../etc"}]},
        7: {"images": [{"filename": "ignored.png"}]},
        "bad": {"images": "not a list"},
    }
    names = [name for name, *_ in q.output_files(outputs, "row")]
    assert len(names) == 5 and len(set(names)) == 5, names
    assert names[:2] == ["row_a_b_0.png", "row_a_b_1.png"]
    assert all(len(n) < 120 and "/" not in n for n in names)
    assert len(list(q.output_files(outputs, "row", include_temp=False))) == 4


def test_output_names_claimed_by_another_row_get_a_distinct_name():
    names = OutputNames({"x_1_2_0.png": "x"})
    assert names.claim("x_1_2_0.png", "x") == "x_1_2_0.png", "a row keeps its own names on a rerun"
    other = names.claim("x_1_2_0.png", "x_1")
    assert other != "x_1_2_0.png" and other.endswith(".png")
    assert names.claim("x_1_2_0.png", "x_1") == other, "the same row asking again gets the same name"
    assert names.claim("X_1_2_0.PNG", "y") not in ("X_1_2_0.PNG", other), "names are compared case-folded"
