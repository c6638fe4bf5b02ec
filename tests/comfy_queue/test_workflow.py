"""Loading and checking workflows, converting override values, applying overrides."""
from __future__ import annotations

import json
import os

import pytest
from fake_comfy import WORKFLOW
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import comfy_queue as q


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


# -- hostile workflows: always a WorkflowError that says what and where ---------------------------


def nested(depth, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("text, message", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"1": {"class_type": "X", "inputs": {"v": ' + "[" * 200 + "]" * 200 + "}}}", "nested deeper than 64"),
    ("[1, 2]", "expected a JSON object of nodes"),
    ('"text"', "got a JSON str"),
    ("{}", "got an empty object"),
    ('{"1": 5}', "node '1' has no 'class_type'"),
    ('{"1": {"class_type": 5}}', "no 'class_type'"),
    ('{"1": {"class_type": "X", "inputs": [1]}}', "'inputs' must be an object"),
    ('{"1": {"class_type": "X", "inputs": {"t": "\\ud800"}}}', "1.inputs.t contains a lone surrogate U\\+D800"),
    ('{"1": {"class_type": "X", "inputs": {"v": NaN}}}', "only finite numbers"),
    ('{"1": {"class_type": "X", "inputs": {"v": 1' + "0" * 30 + "}}}", "integer of 100 bits; integers must lie between"),
    ('{"1": {"class_type": "X", "inputs": {"v": 1' + "0" * 5000 + "}}}", "invalid JSON"),
    ("{not json", "invalid JSON"),
])
def test_hostile_workflow_files_are_workflow_errors(tmp_path, text, message):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(q.WorkflowError, match=message) as info:
        q.load_workflow(path)
    assert str(path) in str(info.value)


def test_unreadable_workflow_files_are_workflow_errors(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"1": "\xe9"}')
    os.mkfifo(tmp_path / "fifo.json")
    for name, message in [("missing.json", "cannot read"), ("latin1.json", "not utf-8 text"),
                          ("fifo.json", "not a regular file"), (".", "not a regular file")]:
        with pytest.raises(q.WorkflowError, match=message):
            q.load_workflow(tmp_path / name)


@pytest.mark.parametrize("workflow", [None, [], "x", {1: {"class_type": "X"}}, {"1": {"class_type": "X",
                                      "inputs": {"v": object()}}}, {"1": {"class_type": "X", "inputs": {"v": nested(100)}}}])
def test_workflows_passed_as_objects_are_checked_too(workflow):
    with pytest.raises(q.WorkflowError):
        q.check_workflow(workflow)
    with pytest.raises(q.QueueError):
        q.apply_overrides(workflow, {"1.v": 2})


def test_huge_or_strange_override_values_are_override_errors():
    with pytest.raises(q.OverrideError) as info:  # not JSON ComfyUI could read: the row itself is refused
        q.apply_overrides(WORKFLOW, {"3.seed": 10**5000, "3.cfg": 10**400, "6.text": "\ud800"})
    text = str(info.value)
    assert "3.seed" in text and "3.cfg" in text and "between -2**64 and 2**64" in text and "lone surrogate" in text
    with pytest.raises(q.OverrideError) as info:  # JSON, but not of the input's type
        q.apply_overrides(WORKFLOW, {"5.width": "9" * 5000, "6.text": {"a": 1}, "10.tiled_vae": nested(3)})
    text = str(info.value)
    assert len(info.value.errors) == 3 and "5.width" in text and "6.text" in text and "10.tiled_vae" in text
    assert len(text) < 3000, "values are cut short in messages"
    with pytest.raises(q.OverrideError, match="must be an object"):
        q.apply_overrides(WORKFLOW, ["3.seed", 1])


# -- property: whatever the values, a result or a QueueError, never another exception -------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12),
)
hostile_value = st.recursive(
    json_leaf | st.builds(nested, st.integers(0, 3000)) | st.builds(object) | st.binary(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=6), st.integers()),
                                                                     children, max_size=4),
    max_leaves=12,
)
override_key = st.one_of(st.sampled_from(["3.seed", "3.cfg", "6.text", "10.tiled_vae", "3.model", "5.width",
                                          "id", "name", "_c", "9.nope", "x"]), st.text(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.one_of(st.dictionaries(override_key, hostile_value, max_size=5), hostile_value), max_size=4),
       node_value=hostile_value)
def test_hostile_rows_and_workflow_values_give_a_result_or_a_queue_error(rows, node_value):
    workflow = {**WORKFLOW, "11": {"class_type": "Extra", "inputs": {"v": node_value}}}
    try:
        workflow = q.check_workflow(workflow)
    except q.QueueError:
        return
    jobs, invalid = q.prepare_jobs(workflow, rows)
    assert len(jobs) + len(invalid) == len(rows)
    for job in jobs:
        json.dumps(job.prompt, allow_nan=False).encode("utf-8")  # what goes to ComfyUI is strict JSON
    for row in rows:
        try:
            q.apply_overrides(workflow, row)
        except q.QueueError as e:
            assert str(e)
