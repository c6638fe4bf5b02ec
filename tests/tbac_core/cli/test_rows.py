"""Batch rows as job values: conversion, unknown fields, ids."""
from __future__ import annotations

import pytest

from tbac_core.cli.rows import read_rows
from tbac_core.errors import UsageError


def test_read_rows_problems(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '# a comment\n'
        '{"id": "a", "prompt": "x", "steps": 2.0, "layers": [2, 3], "guidance_scale": "5"}\n'
        '{"id": "a", "prompt": "y"}\n'
        'not json\n'
        '[1, 2]\n'
        '{"prompt": "z", "seed": true, "steps": "3.5", "images": 5, "sizes": 3}\n'
    )
    rows = read_rows(path)
    assert [r.where for r in rows] == [f"rows.jsonl line {n}" for n in (2, 3, 4, 5, 6)]
    assert rows[0].values == {"prompt": "x", "steps": 2, "layers": "2,3", "guidance": 5.0} and not rows[0].problems
    assert "already used by row 1" in rows[1].problems[0][1]
    assert "not valid JSON" in rows[2].problems[0][1]
    assert "expected a JSON object" in rows[3].problems[0][1]
    problems = dict(rows[4].problems)
    assert problems["seed"] == "expected a number, got True"
    assert problems["steps"] == "expected a whole number, got '3.5'"
    assert "image paths" in problems["images"]
    assert "unknown field (did you mean 'seed'?)" in problems["sizes"] or "unknown field" in problems["sizes"]
    assert "allowed: prompt, negative_prompt" in problems["sizes"]
    with pytest.raises(UsageError, match="Cannot read the rows file"):
        read_rows(tmp_path / "missing.csv")
