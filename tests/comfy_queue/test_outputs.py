"""Output files: atomic writes, distinct local names for distinct outputs."""
from __future__ import annotations

import os

import pytest

import comfy_queue as q


def test_atomic_write(tmp_path):
    target = tmp_path / "f.png"
    with pytest.raises(TypeError):
        q.atomic_write(str(target), "not bytes")  # fails mid-write
    assert os.listdir(tmp_path) == [], "no target and no temp file left behind"
    q.atomic_write(str(target), b"data")
    assert target.read_bytes() == b"data"
