"""Loading and checking workflows, converting override values, applying overrides."""
from __future__ import annotations

import json

import pytest

import comfy_queue as q
from fake_comfy import WORKFLOW


@pytest.mark.parametrize("value, current, text, expected", [
    ("5", 1, True, 5), ("5.0", 1, True, 5), (" -3 ", 1, True, -3), (2.0, 1, False, 2), ("12", 1, False, 12),
    ("0.25", 1.0, True, 0.25), (3, 1.0, False, 3.0), ("1e-3", 1.0, True, 0.001),
    ("TRUE", False, True, True), ("off", True, True, False), (1, False, False, True),
    ("7", "text", True, "7"), (42, "text", False, "42"),
    ('["a", 1]', None, True, ["a", 1]), ("plain", None, True, "plain"), (["8", 0], ["3", 0], False, ["8", 0]),
])
def test_coerce_value(value, current, text, expected):
    result = q.coerce_value(value, current, text)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value, current, message", [
    ("abc", 1, "expected an integer"), ("2.5", 1, "expected an integer"), (True, 1, "expected an integer"),
    ("nan", 1.0, "finite number"), ("maybe", False, "boolean"), (2, False, "boolean"),
    ("x", ["4", 0], "connected to output 0 of node 4"), ([1], "text", "expected text"),
])
def test_coerce_value_errors(value, current, message):
    with pytest.raises(ValueError, match=message):
        q.coerce_value(value, current, isinstance(value, str))


def test_unknown_nodes_and_inputs_are_clear_errors():
    with pytest.raises(q.OverrideError) as info:
        q.apply_overrides(WORKFLOW, {"id": "x", "99.seed": 1, "3.sed": 2, "3.steps": "many", "3.model": "m"})
    errors = info.value.errors
    assert len(errors) == 4
    assert errors[0].startswith("99.seed: unknown node id '99'") and "3 (KSampler)" in errors[0]
    assert "node 3 (KSampler) has no input 'sed' (did you mean 'seed'?)" in errors[1]
    assert "3.steps" in errors[2] and "expected an integer" in errors[2]
    assert "connected to output 0 of node 4" in errors[3]


def test_workflow_loading(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(q.WorkflowError, match="Export \\(API\\)"):
        q.load_workflow(ui)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": WORKFLOW, "client_id": "x"}))
    assert q.load_workflow(wrapped) == WORKFLOW
