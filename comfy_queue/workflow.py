"""The workflow: load and check an API-format ComfyUI workflow, apply a row's ``node_id.input``
overrides (converting each value to the type of the input it replaces) and hash the result."""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from typing import Any, Mapping

from .errors import OverrideError, WorkflowError
from .inputs import json_value_problem, parse_json, read_input_text
from .rows import Row, make_row


def load_workflow(path: str | os.PathLike) -> dict:
    """Read an API-format workflow and check its shape, explaining what to do with a UI workflow."""
    return check_workflow(parse_json(read_input_text(path, "workflow file", WorkflowError), str(path), WorkflowError),
                          str(path))


def check_workflow(data: Any, where: str = "workflow") -> dict:
    """Return ``data`` as an API-format workflow or raise WorkflowError saying what is wrong."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data:
        data = data["prompt"]  # a saved /prompt request body: {"prompt": {...}, "client_id": ...}
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(
            f"{where} is a UI-format workflow (it has 'nodes' and 'links'); the queue needs the API "
            f"format: in ComfyUI use Workflow > Export (API) and pass that file."
        )
    if not isinstance(data, dict) or not data:
        got = "an empty object" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise WorkflowError(f"{where}: expected a JSON object of nodes {{node_id: {{class_type, inputs}}}}, got {got}")
    for node_id, node in data.items():
        if not isinstance(node_id, str):
            raise WorkflowError(f"{where}: node id {node_id!r} must be text")
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"{where}: node {node_id!r} has no 'class_type'; is this an API-format workflow?")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{where}: node {node_id} ({node['class_type']}): 'inputs' must be an object")
    problem = json_value_problem(data)
    if problem:
        raise WorkflowError(f"{where}: {problem}")
    return data


# --------------------------------------------------------------------------------------------
# Values


_TRUE = {"true", "yes", "y", "on", "1", "t"}
_FALSE = {"false", "no", "n", "off", "0", "f"}


def _is_link(value: Any) -> bool:
    """API-format links are ``[source_node_id, output_index]``."""
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], int) and not isinstance(value[1], bool)
    )


def coerce_value(value: Any, current: Any, text: bool = False) -> Any:
    """Convert an override ``value`` to the type of the input's ``current`` value.

    ``text`` says the value came from a CSV cell. Raises ValueError with a readable reason.
    """
    if _is_link(current):
        if _is_link(value):
            return value  # rewiring with a JSON link is allowed
        raise ValueError(
            f"this input is connected to output {current[1]} of node {current[0]}; override that "
            f"node's value instead (or give a [node_id, output_index] link in JSONL)"
        )
    if isinstance(current, bool):  # before int: bool is an int subclass
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected a boolean (true/false) like the current value {current!r}, got {_show(value)}")
    if isinstance(current, int):
        return _to_int(value, current)
    if isinstance(current, float):
        return _to_float(value, current)
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a JSONL prompt of 42
        raise ValueError(f"expected text like the current value, got {_show(value)}")
    # None, lists, dicts, ...: nothing to match; a CSV cell may hold JSON for these.
    if text and isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or absurdly nested): keep the text
            return value
    return value


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` of a user's value, cut short: error messages must stay readable."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _to_int(value: Any, current: Any) -> int:
    number: Any = value
    if isinstance(value, str):
        s = value.strip()
        try:
            return int(s)
        except ValueError:
            try:
                number = float(s)
            except ValueError:
                number = None
    if isinstance(number, bool) or number is None:
        pass
    elif isinstance(number, int):
        return number
    elif isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)  # "5.0" or 5.0 for an int input is clearly meant as 5
    raise ValueError(f"expected an integer like the current value {current!r}, got {_show(value)}")


def _to_float(value: Any, current: Any) -> float:
    number: Any = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected a finite number like the current value {current!r}, got {_show(value)}")
    return number


# --------------------------------------------------------------------------------------------
# Overrides


def _describe_node(workflow: Mapping[str, Any], node_id: str) -> str:
    node = workflow[node_id]
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    label = node["class_type"] if not title or title == node["class_type"] else f"{node['class_type']} '{title}'"
    return f"node {node_id} ({label})"


def _split_key(key: str, workflow: Mapping[str, Any]) -> tuple[str, str]:
    """Split ``node_id.input`` at the first dot that names an existing node (ids may contain dots)."""
    start = 0
    while (dot := key.find(".", start)) != -1:
        if key[:dot] in workflow:
            return key[:dot], key[dot + 1:]
        start = dot + 1
    node_id, _, input_name = key.partition(".")
    return node_id, input_name


def apply_row_overrides(workflow: Mapping[str, Any], overrides: Mapping[str, Any], text: bool):
    """Return (new workflow, applied overrides, errors); the input workflow is never modified."""
    result = copy.deepcopy(dict(workflow))
    applied: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in overrides.items():
        node_id, input_name = _split_key(str(key), result)
        if node_id not in result:
            known = ", ".join(f"{n} ({result[n]['class_type']})" for n in list(result)[:30])
            hint = difflib.get_close_matches(node_id, list(result), n=1)
            errors.append(
                f"{key}: unknown node id {node_id!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; the workflow's nodes are: {known}"
            )
            continue
        inputs = result[node_id].setdefault("inputs", {})
        if input_name not in inputs:
            hint = difflib.get_close_matches(input_name, list(inputs), n=1)
            errors.append(
                f"{key}: {_describe_node(result, node_id)} has no input {input_name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; its inputs are: {', '.join(inputs) or '(none)'}"
            )
            continue
        try:
            coerced = coerce_value(value, inputs[input_name], text)
        except ValueError as e:
            errors.append(f"{key} ({_describe_node(result, node_id)}): {e}")
            continue
        problem = json_value_problem(coerced)  # e.g. a CSV cell of JSON nested too deeply
        if problem:
            errors.append(f"{key} ({_describe_node(result, node_id)}): {problem}")
            continue
        inputs[input_name] = applied[key] = coerced
    return result, applied, errors


def apply_overrides(workflow: Mapping[str, Any], row: Row | Mapping[str, Any]) -> dict:
    """Return a copy of ``workflow`` with the row's ``node_id.input`` overrides applied.

    ``row`` is a Row or a plain mapping (its ``id``/``name``/comment keys are ignored). Raises
    OverrideError listing every unknown node, unknown input and unconvertible value of the row.
    """
    if not isinstance(row, Row):
        if not isinstance(row, Mapping):
            raise OverrideError([f"a row must be an object of node_id.input keys, got {type(row).__name__}"])
        row = make_row(row, 0)
    if row.error:
        raise OverrideError([row.error])
    result, _, errors = apply_row_overrides(check_workflow(workflow), row.overrides, row.text)
    if errors:
        raise OverrideError(errors)
    return result


def workflow_hash(workflow: Mapping[str, Any]) -> str:
    """A stable hash of a submitted workflow, so resume can tell that a row was edited."""
    blob = json.dumps(workflow, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
