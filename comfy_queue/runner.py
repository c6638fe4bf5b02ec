"""Render a batch of ComfyUI jobs: one API-format workflow, one row of overrides per job.

Usage (always run it as a module; see the note at the end)::

    python -m comfy_queue workflow_api.json rows.jsonl --out renders/ \\
        --server http://gpu1:8188 --server http://gpu2:8188 [--job-timeout 900] [--force] [--dry-run]

* ``workflow_api.json`` is a workflow saved with ComfyUI's "Export (API)" / "Save (API Format)":
  ``{node_id: {"class_type": ..., "inputs": {...}}}``.
* ``rows`` is JSONL (one object per line) or CSV (one row per line). Keys/columns named
  ``node_id.input`` override that input, e.g. ``3.seed`` or ``6.text``. ``id`` (or ``name``) names
  the row: it becomes the prefix of the row's output files and its key in the manifest; without
  one, rows are called ``row0001``, ``row0002``... by position. Keys starting with ``_`` or ``#``
  are comments and ignored; any other key without a dot is an error (it is usually a typo).
  CSV cells are text: they are converted to int/float/bool when the workflow's current value of
  that input has that type, and an empty cell means "no override for this row".
* Outputs land in ``--out`` as ``<row-id>_<node-id>_<n>.<ext>`` and ``manifest.jsonl`` records each
  finished row (id, prompt_id, server, files, status, error, a hash of the submitted workflow).
  Rerunning skips rows recorded as done whose files still exist and whose submitted workflow is
  unchanged (editing a row or the workflow re-renders it); ``--force`` re-renders everything.

Work is shared by one worker thread per server pulling from one job queue. A server that fails
``--dead-after`` consecutive requests at the connection level (refused, reset, timed out, 502-504)
is marked dead and the job it was working on goes back to the queue for the other servers. Rows
rejected by ComfyUI (HTTP 400 node errors) or failing while executing are reported and the batch
goes on; the exit status is 1 if any row failed, 2 for unusable arguments or files.

Only the Python standard library is used for HTTP, and only the given server addresses are
contacted (environment proxies are ignored on purpose). ``tqdm`` draws a progress bar when it is
installed and stderr is a terminal.

"""
from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import difflib
import hashlib
import http.client
import json
import math
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "Row",
    "Summary",
    "ComfyClient",
    "QueueError",
    "WorkflowError",
    "OverrideError",
    "ServerUnavailable",
    "PromptRejected",
    "load_workflow",
    "load_rows",
    "apply_overrides",
    "coerce_value",
    "run_queue",
    "main",
]

DEFAULT_SERVER = "http://127.0.0.1:8188"
MANIFEST_NAME = "manifest.jsonl"
RESERVED_KEYS = ("id", "name")  # row naming; ``id`` wins over ``name``
# ComfyUI forgets queued prompts when it restarts; every this many empty /history polls we look
# at /queue to notice a prompt that will never finish instead of waiting for it forever.
QUEUE_CHECK_EVERY = 5
MAX_LOST_RESUBMITS = 2


# --------------------------------------------------------------------------------------------
# Errors


class QueueError(Exception):
    """Base class of the errors this module raises on purpose."""


class WorkflowError(QueueError, ValueError):
    """The workflow file is not an API-format ComfyUI workflow."""


class OverrideError(QueueError, ValueError):
    """A row's overrides do not fit the workflow; ``errors`` lists every problem of the row."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class ServerUnavailable(QueueError):
    """A request failed at the connection level: the server may be down, so try elsewhere."""


class PromptRejected(QueueError):
    """ComfyUI refused the prompt (HTTP 400): the row is wrong, another server would refuse it too."""

    def __init__(self, message: str, payload: Any = None):
        self.payload = payload
        super().__init__(message)


class RowFailed(QueueError):
    """The row failed for a reason that retrying on another server would not fix."""

    def __init__(self, message: str, prompt_id: str | None = None):
        self.prompt_id = prompt_id
        super().__init__(message)


class _ServerDead(QueueError):
    """Internal: the worker's server was declared dead; its current job must move elsewhere."""


class _PromptLost(QueueError):
    """Internal: the server no longer knows the prompt (it restarted); submit the job again."""


class _Cancelled(QueueError):
    """Internal: the run was interrupted (Ctrl+C)."""


# --------------------------------------------------------------------------------------------
# Loading the workflow and the rows


def load_workflow(path: str | os.PathLike) -> dict:
    """Read an API-format workflow and check its shape, explaining what to do with a UI workflow."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: not valid JSON ({e})") from None
    return check_workflow(data, str(path))


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
        raise WorkflowError(f"{where}: expected a JSON object of nodes {{node_id: {{class_type, inputs}}}}")
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"{where}: node {node_id!r} has no 'class_type'; is this an API-format workflow?")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{where}: node {node_id} ({node['class_type']}): 'inputs' must be an object")
    return data


@dataclasses.dataclass
class Row:
    """One job: where it came from, its name and its ``node_id.input`` overrides.

    ``text`` is True for rows read from CSV, whose values are all strings and need converting;
    ``error`` is set when the row itself could not be read (the batch goes on without it).
    """

    index: int
    id: str
    overrides: dict[str, Any]
    where: str = ""
    text: bool = False
    error: str | None = None


def _safe_name(value: Any) -> str:
    """Make ``value`` usable in a file name on every OS (the ids end up in output names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")


def make_row(data: Mapping[str, Any], index: int, where: str = "", text: bool = False) -> Row:
    """Build a Row from one JSONL object / CSV record: split naming keys from overrides."""
    overrides: dict[str, Any] = {}
    name = None
    errors = []
    for key, value in data.items():
        key = str(key).strip() if key is not None else ""
        if key in RESERVED_KEYS:
            if value not in (None, "") and (name is None or key == "id"):
                name = value
        elif not key or key.startswith(("_", "#")):
            continue  # comment column, or the empty header of a trailing CSV comma
        elif "." not in key:
            errors.append(
                f"column/key {key!r} is not of the form node_id.input (reserved: {', '.join(RESERVED_KEYS)}; "
                f"prefix comment columns with '_')"
            )
        elif text and value in (None, ""):
            continue  # empty CSV cell: keep the workflow's value for this row
        else:
            overrides[key] = value
    row_id = _safe_name(name) if name is not None else ""
    if not row_id:
        row_id = f"row{index:04d}"
    return Row(index, row_id, overrides, where, text, "; ".join(errors) or None)


def load_rows(path: str | os.PathLike) -> list[Row]:
    """Read rows from ``.csv`` (header of ``node_id.input`` columns) or JSONL (``.jsonl``/``.ndjson``).

    A ``.json`` file may also hold a list of row objects. Rows that cannot be parsed come back with
    ``error`` set rather than stopping the batch.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv" or ext == ".tsv":
        # utf-8-sig: spreadsheets like to start CSV files with a byte order mark.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            if not reader.fieldnames:
                return []
            rows = []
            for i, record in enumerate(reader, 1):
                extra = record.pop(None, None)  # cells beyond the header
                row = make_row(record, i, f"{path} line {reader.line_num}", text=True)
                if extra and any(c.strip() for c in extra):
                    row.error = _join(row.error, f"{len(extra)} more cell(s) than header columns")
                rows.append(row)
            return rows
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if ext == ".json":
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise QueueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise QueueError(f"{path}: a .json rows file must hold a list of objects (or use .jsonl)")
        return [_row_from_json(obj, i, f"{path} item {i}") for i, obj in enumerate(data, 1)]
    rows = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "//")):
            continue
        index = len(rows) + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(index, f"row{index:04d}", {}, f"{path} line {line_no}", error=f"invalid JSON: {e}"))
            continue
        rows.append(_row_from_json(obj, index, f"{path} line {line_no}"))
    return rows


def _row_from_json(obj: Any, index: int, where: str) -> Row:
    if not isinstance(obj, dict):
        return Row(index, f"row{index:04d}", {}, where, error=f"expected a JSON object, got {type(obj).__name__}")
    return make_row(obj, index, where)


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


# --------------------------------------------------------------------------------------------
# Overrides


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
        raise ValueError(f"expected a boolean (true/false) like the current value {current!r}, got {value!r}")
    if isinstance(current, int):
        return _to_int(value, current)
    if isinstance(current, float):
        return _to_float(value, current)
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a JSONL prompt of 42
        raise ValueError(f"expected text like the current value, got {value!r}")
    # None, lists, dicts, ...: nothing to match; a CSV cell may hold JSON for these.
    if text and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


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
    raise ValueError(f"expected an integer like the current value {current!r}, got {value!r}")


def _to_float(value: Any, current: Any) -> float:
    number: Any = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected a finite number like the current value {current!r}, got {value!r}")
    return number


def _describe_node(workflow: Mapping[str, Any], node_id: str) -> str:
    node = workflow[node_id]
    title = (node.get("_meta") or {}).get("title")
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


def _apply(workflow: Mapping[str, Any], overrides: Mapping[str, Any], text: bool):
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
            inputs[input_name] = applied[key] = coerce_value(value, inputs[input_name], text)
        except ValueError as e:
            errors.append(f"{key} ({_describe_node(result, node_id)}): {e}")
    return result, applied, errors


def apply_overrides(workflow: Mapping[str, Any], row: Row | Mapping[str, Any]) -> dict:
    """Return a copy of ``workflow`` with the row's ``node_id.input`` overrides applied.

    ``row`` is a Row or a plain mapping (its ``id``/``name``/comment keys are ignored). Raises
    OverrideError listing every unknown node, unknown input and unconvertible value of the row.
    """
    if not isinstance(row, Row):
        row = make_row(row, 0)
    if row.error:
        raise OverrideError([row.error])
    result, _, errors = _apply(workflow, row.overrides, row.text)
    if errors:
        raise OverrideError(errors)
    return result


def workflow_hash(workflow: Mapping[str, Any]) -> str:
    """A stable hash of a submitted workflow, so resume can tell that a row was edited."""
    blob = json.dumps(workflow, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# HTTP client


def normalize_server(server: str) -> str:
    """``host:port`` -> ``http://host:port``; no trailing slash."""
    server = server.strip()
    if "://" not in server:
        server = "http://" + server
    return server.rstrip("/")


class ComfyClient:
    """Minimal blocking client for one ComfyUI server (``/prompt``, ``/history``, ``/view``, ``/queue``).

    Connection-level failures raise ServerUnavailable, so callers can decide to try elsewhere;
    anything the server actually answered is returned or raised as a row-level error.
    """

    def __init__(self, server: str, timeout: float = 30.0):
        self.server = normalize_server(server)
        self.timeout = timeout
        # An empty ProxyHandler: talk to exactly the address given, even if *_proxy is set.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"ComfyClient({self.server!r})"

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                with e:
                    payload = e.read()
                if e.code in (502, 503, 504):  # a proxy in front of a server that is down
                    raise ServerUnavailable(f"{self.server}: HTTP {e.code} for {path}") from None
                return e.code, payload
        except ServerUnavailable:
            raise
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout...
            reason = getattr(e, "reason", None) or e
            raise ServerUnavailable(f"{self.server}: {type(reason).__name__}: {reason}") from None

    def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, payload = self._request(method, path, body)
        try:
            return status, json.loads(payload or b"null")
        except ValueError:
            if status == 200:
                # A 200 that is not JSON: this is not a ComfyUI API (wrong port, login page...).
                raise ServerUnavailable(f"{self.server}: {path} did not answer JSON; is this a ComfyUI server?")
            return status, payload.decode("utf-8", "replace")

    def submit(self, workflow: Mapping[str, Any], client_id: str = "") -> dict:
        """POST /prompt; return ComfyUI's answer (``prompt_id``, ``number``, ``node_errors``).

        Raises PromptRejected with the node errors spelled out when ComfyUI answers 400.
        """
        status, data = self._json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        if status == 200 and isinstance(data, dict) and data.get("prompt_id"):
            return data
        if status == 400:
            raise PromptRejected(format_prompt_error(data), data)
        if status in (404, 405):
            raise ServerUnavailable(f"{self.server}: /prompt answered HTTP {status}; is this a ComfyUI server?")
        raise RowFailed(f"{self.server}: /prompt answered HTTP {status}: {str(data)[:500]}")

    def history(self, prompt_id: str) -> dict | None:
        """GET /history/{prompt_id}: the history entry once the prompt has finished, else None."""
        status, data = self._json("GET", "/history/" + urllib.parse.quote(prompt_id, safe=""))
        if status != 200 or not isinstance(data, dict):
            raise ServerUnavailable(f"{self.server}: /history answered HTTP {status}")
        entry = data.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def queue(self) -> dict:
        """GET /queue: ``{"queue_running": [...], "queue_pending": [...]}``."""
        status, data = self._json("GET", "/queue")
        if status != 200 or not isinstance(data, dict):
            raise ServerUnavailable(f"{self.server}: /queue answered HTTP {status}")
        return data

    def queued_prompt_ids(self) -> tuple[set[str], set[str]]:
        """(running, pending) prompt ids; queue items are ``[number, prompt_id, prompt, ...]``."""
        data = self.queue()

        def ids(items):
            return {str(item[1]) for item in items or () if isinstance(item, list) and len(item) > 1}

        return ids(data.get("queue_running")), ids(data.get("queue_pending"))

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """GET /view: the bytes of one output file."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, payload = self._request("GET", "/view?" + query)
        if status != 200:
            raise RowFailed(f"{self.server}: /view of {subfolder + '/' if subfolder else ''}{filename} "
                            f"({type}) answered HTTP {status}")
        return payload

    def cancel(self, prompt_id: str) -> None:
        """Best effort: drop the prompt from the queue, or interrupt it if it is the one running.

        The interrupt is only sent when /queue shows our prompt running, because a ComfyUI too old
        for targeted interrupts would otherwise stop somebody else's job.
        """
        try:
            running, pending = self.queued_prompt_ids()
            if prompt_id in pending:
                self._request("POST", "/queue", {"delete": [prompt_id]})
            elif prompt_id in running:
                self._request("POST", "/interrupt", {"prompt_id": prompt_id})
        except QueueError:
            pass


def format_prompt_error(data: Any) -> str:
    """One line per problem of a /prompt 400 answer: node id, class_type, message, details."""
    if not isinstance(data, dict):
        return f"ComfyUI rejected the prompt: {str(data)[:500]}"
    parts = []
    node_errors = data.get("node_errors") or {}
    for node_id, info in node_errors.items() if isinstance(node_errors, dict) else ():
        info = info if isinstance(info, dict) else {}
        class_type = info.get("class_type", "?")
        for err in info.get("errors") or [{}]:
            message = err.get("message") or "invalid"
            details = err.get("details")
            parts.append(f"node {node_id} ({class_type}): {message}" + (f": {details}" if details else ""))
    error = data.get("error")
    if not parts or not node_errors:
        if isinstance(error, dict):
            message = error.get("message") or error.get("type") or "rejected"
            details = error.get("details")
            parts.insert(0, f"{message}" + (f": {details}" if details else ""))
        elif error:
            parts.insert(0, str(error))
    return "ComfyUI rejected the prompt: " + ("; ".join(parts) or "no reason given")


def describe_execution_error(status: Mapping[str, Any]) -> str:
    """Turn a failed history entry's status messages into one readable line."""
    for event, info in status.get("messages") or ():
        info = info if isinstance(info, dict) else {}
        where = f"node {info.get('node_id', '?')} ({info.get('node_type', '?')})"
        if event == "execution_error":
            kind = info.get("exception_type") or "error"
            return f"execution failed at {where}: {kind}: {info.get('exception_message', '').strip()}"
        if event == "execution_interrupted":
            return f"execution was interrupted at {where}"
    return f"execution failed (status {status.get('status_str', 'unknown')!r}, no error message)"


# --------------------------------------------------------------------------------------------
# Output files and the manifest


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file or complete.

    The temporary name is hidden and ends in ``.part``, so neither a reader nor resume mistakes it
    for an output.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _node_sort_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def output_files(outputs: Mapping[str, Any], row_id: str, include_temp: bool = True):
    """Yield ``(local_name, filename, subfolder, type)`` for every file in a history entry's outputs.

    Names are ``<row-id>_<node-id>_<n><ext>`` with ``n`` counting the node's files in a fixed order,
    so the same row always produces the same names.
    """
    for node_id in sorted(outputs, key=_node_sort_key):
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        n = 0
        for kind in sorted(node_out):  # images, gifs, audio, ... whatever holds file records
            items = node_out[kind]
            for item in items if isinstance(items, list) else ():
                if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
                    continue
                file_type = item.get("type") or "output"
                if file_type == "temp" and not include_temp:
                    continue
                ext = os.path.splitext(item["filename"])[1] or ".bin"
                yield f"{row_id}_{_safe_name(node_id)}_{n}{ext}", item["filename"], item.get("subfolder") or "", file_type
                n += 1


class Manifest:
    """``manifest.jsonl`` in the output folder: one JSON record per finished row, last one wins.

    Appending whole lines (and fsync-ing them) after a row's files are in place makes the record
    the commit point: a crash before it means the row simply runs again.
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, MANIFEST_NAME)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                content = f.read()
            self._needs_newline = bool(content) and not content.endswith(b"\n")
            for line in content.decode("utf-8", "replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: that row just runs again
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    self.records[record["id"]] = record

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                if self._needs_newline:  # don't glue our record onto a truncated line
                    f.write("\n")
                    self._needs_newline = False
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.records[record["id"]] = record

    def done_reason(self, row_id: str, sha: str, out_dir: str) -> tuple[bool, str]:
        """(True, why) when the row can be skipped; (False, why it runs) otherwise."""
        record = self.records.get(row_id)
        if not record:
            return False, "new"
        if record.get("status") != "done":
            return False, f"previous attempt {record.get('status', 'unknown')}"
        if record.get("workflow_sha256") != sha:
            return False, "its overrides or the workflow changed since it was rendered"
        missing = [f for f in record.get("files", []) if not os.path.isfile(os.path.join(out_dir, f))]
        if missing:
            return False, f"{len(missing)} output file(s) missing ({missing[0]}...)"
        return True, f"done on {record.get('server')} ({len(record.get('files', []))} file(s))"


# --------------------------------------------------------------------------------------------
# Running the batch


@dataclasses.dataclass
class Summary:
    """What a run did. ``failed`` maps row id to its error; ``per_server`` counts per server URL."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    per_server: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [
            f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed "
            f"in {self.elapsed:.1f}s"
        ]
        for server, stats in self.per_server.items():
            line = f"  {server}: {stats['done']} done, {stats['failed']} failed"
            if stats.get("handed_off"):
                line += f", {stats['handed_off']} handed to other servers"
            if stats.get("dead"):
                line += f" [dead: {stats['dead']}]"
            lines.append(line)
        if self.failed:
            lines.append("failed rows:")
            lines += [f"  {row_id}: {error}" for row_id, error in self.failed.items()]
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    row: Row
    prompt: dict
    sha: str
    overrides: dict
    lost: int = 0  # times a server forgot the prompt (restart) and it was resubmitted


class _JobBoard:
    """The shared job queue. Jobs may come back (their server died), so "empty" is not "finished":
    workers wait until a job is available or no job is unfinished."""

    def __init__(self, jobs: Iterable[_Job]):
        self._cond = threading.Condition()
        self._jobs = collections.deque(jobs)
        self._unfinished = len(self._jobs)

    def take(self, should_stop: Callable[[], bool]) -> _Job | None:
        with self._cond:
            while True:
                if self._unfinished == 0 or should_stop():
                    return None
                if self._jobs:
                    return self._jobs.popleft()
                self._cond.wait(0.1)

    def put_back(self, job: _Job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()

    def drain(self) -> list[_Job]:
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs


class _Server:
    """Per-server health and counters, shared by the worker and the final summary."""

    def __init__(self, client: ComfyClient, dead_after: int):
        self.client = client
        self.dead_after = max(1, dead_after)
        self.failures = 0
        self.dead: str | None = None
        self.stats = {"done": 0, "failed": 0, "handed_off": 0, "dead": None}
        self.lock = threading.Lock()

    def record_success(self) -> None:
        with self.lock:
            self.failures = 0

    def record_failure(self, error: Exception) -> bool:
        """Count a connection failure; return True when the server is (now) dead."""
        with self.lock:
            self.failures += 1
            if self.failures >= self.dead_after and not self.dead:
                self.dead = self.stats["dead"] = f"{self.failures} connection failures in a row, last: {error}"
            return self.dead is not None


class _Runner:
    """Shared state of one run_queue call; each server gets a thread running ``work``."""

    def __init__(self, board, manifest, out_dir, summary, log, progress, *, job_timeout, poll_interval,
                 retry_delay, include_temp, cancel):
        self.board = board
        self.manifest = manifest
        self.out_dir = out_dir
        self.summary = summary
        self.log = log
        self.progress = progress
        self.job_timeout = job_timeout
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.include_temp = include_temp
        self.cancel = cancel
        self.client_id = f"tbac-queue-{uuid.uuid4().hex[:12]}"
        self.lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise _Cancelled()

    def _call(self, server: _Server, fn: Callable[[], Any]) -> Any:
        """Run one request, retrying the same server on connection errors until it is declared dead."""
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            if server.dead:
                raise _ServerDead(server.dead)
            try:
                result = fn()
            except ServerUnavailable as e:
                if server.record_failure(e):
                    raise _ServerDead(server.dead) from None
                self._sleep(min(10.0, self.retry_delay * server.failures))
                continue
            server.record_success()
            return result

    def _finish(self, job: _Job, server: _Server | None, status: str, *, prompt_id=None, files=(),
                error=None, started=None) -> None:
        record = {
            "id": job.row.id,
            "row": job.row.index,
            "status": status,
            "prompt_id": prompt_id,
            "server": server.client.server if server else None,
            "files": list(files),
            "error": error,
            "overrides": job.overrides,
            "workflow_sha256": job.sha,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - started, 3) if started else None,
        }
        self.manifest.append(record)
        with self.lock:
            if status == "done":
                self.summary.done.append(job.row.id)
            else:
                self.summary.failed[job.row.id] = error or status
            if server:
                server.stats[status if status == "done" else "failed"] += 1
        where = f" on {server.client.server}" if server else ""
        if status == "done":
            self.log(f"{job.row.id}: done{where} ({len(record['files'])} file(s))")
        else:
            self.log(f"{job.row.id}: FAILED{where}: {error}")
        self.progress()
        self.board.finish()

    # -- the worker ------------------------------------------------------------------------

    def work(self, server: _Server) -> None:
        while True:
            job = self.board.take(lambda: bool(server.dead) or self.cancel.is_set())
            if job is None:
                return
            started = time.monotonic()
            try:
                prompt_id, files = self._run_job(server, job)
            except _ServerDead:
                # Not the row's fault: hand it to the servers still alive, and stop this worker.
                with self.lock:
                    server.stats["handed_off"] += 1
                self.log(f"{server.client.server} is dead ({server.dead}); {job.row.id} goes back to the queue")
                self.board.put_back(job)
                return
            except _Cancelled:
                self.board.put_back(job)
                return
            except (PromptRejected, RowFailed) as e:
                self._finish(job, server, "failed", prompt_id=getattr(e, "prompt_id", None), error=str(e),
                             started=started)
                continue
            except Exception as e:  # a bug or an odd answer must not kill the worker and its server
                self._finish(job, server, "failed", error=f"unexpected {type(e).__name__}: {e}", started=started)
                continue
            self._finish(job, server, "done", prompt_id=prompt_id, files=files, started=started)

    def _run_job(self, server: _Server, job: _Job) -> tuple[str, list[str]]:
        client = server.client
        while True:
            answer = self._call(server, lambda: client.submit(job.prompt, self.client_id))
            prompt_id = str(answer["prompt_id"])
            if answer.get("node_errors"):
                # 200 with node errors: ComfyUI runs the outputs that validated and drops the rest.
                self.log(f"{job.row.id}: warning, some outputs were dropped: "
                         f"{format_prompt_error({'node_errors': answer['node_errors']})}")
            try:
                entry = self._wait(server, prompt_id)
                break
            except _PromptLost:
                job.lost += 1
                if job.lost > MAX_LOST_RESUBMITS:
                    raise RowFailed(f"{client.server} lost the prompt {job.lost} times (restarting?)", prompt_id)
                self.log(f"{job.row.id}: {client.server} no longer knows prompt {prompt_id} "
                         f"(restarted?); submitting it again")
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            raise RowFailed(describe_execution_error(status), prompt_id)
        files = []
        for name, filename, subfolder, file_type in output_files(entry.get("outputs") or {}, job.row.id,
                                                                 self.include_temp):
            try:
                data = self._call(server, lambda: client.view(filename, subfolder, file_type))
            except RowFailed as e:
                raise RowFailed(str(e), prompt_id) from None
            atomic_write(os.path.join(self.out_dir, name), data)
            files.append(name)
        return prompt_id, files

    def _wait(self, server: _Server, prompt_id: str) -> dict:
        """Poll /history until the prompt is there; detect lost prompts and the per-job timeout."""
        client = server.client
        deadline = time.monotonic() + self.job_timeout if self.job_timeout else None
        polls = 0
        while True:
            entry = self._call(server, lambda: client.history(prompt_id))
            if entry is not None:
                return entry
            polls += 1
            if polls % QUEUE_CHECK_EVERY == 0:
                running, pending = self._call(server, client.queued_prompt_ids)
                if prompt_id not in running and prompt_id not in pending:
                    # It may have finished between the two requests: look once more.
                    entry = self._call(server, lambda: client.history(prompt_id))
                    if entry is not None:
                        return entry
                    raise _PromptLost()
            if deadline is not None and time.monotonic() >= deadline:
                client.cancel(prompt_id)
                raise RowFailed(f"no result from {client.server} after {self.job_timeout:g}s (--job-timeout); "
                                f"the prompt was removed from its queue or interrupted", prompt_id)
            self._sleep(self.poll_interval)


def _default_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_jobs(workflow: Mapping[str, Any], rows: Iterable[Row | Mapping[str, Any]]):
    """Validate every row up front. Returns (jobs, {row_id: error}) so bad rows never reach a server."""
    jobs: list[_Job] = []
    invalid: dict[str, tuple[Row, str]] = {}
    seen: dict[str, Row] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Row):
            row = make_row(row, i)
        where = f" ({row.where})" if row.where else ""
        if row.id in seen:
            invalid[f"{row.id}@{row.index}"] = (row, f"duplicate row id {row.id!r}{where}; "
                                                     f"row {seen[row.id].index} already uses it")
            continue
        seen[row.id] = row
        if row.error:
            invalid[row.id] = (row, row.error + where)
            continue
        prompt, applied, errors = _apply(workflow, row.overrides, row.text)
        if errors:
            invalid[row.id] = (row, "; ".join(errors) + where)
            continue
        jobs.append(_Job(row, prompt, workflow_hash(prompt), applied))
    return jobs, invalid


def run_queue(
    workflow: Mapping[str, Any],
    rows: Iterable[Row | Mapping[str, Any]],
    servers: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    job_timeout: float | None = None,
    poll_interval: float = 1.0,
    http_timeout: float = 30.0,
    dead_after: int = 3,
    retry_delay: float = 1.0,
    include_temp: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Render every row on ``servers`` into ``out_dir`` and return a Summary (see the module doc).

    Rows are validated first; invalid rows fail without being submitted. Rows already done
    according to the manifest are skipped unless ``force``.
    """
    started = time.monotonic()
    workflow = check_workflow(workflow)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log = log or _default_log
    servers = list(dict.fromkeys(normalize_server(s) for s in servers))
    if not servers:
        raise QueueError("no server given")
    summary = Summary(per_server={})
    manifest = Manifest(out_dir)

    jobs, invalid = prepare_jobs(workflow, rows)
    for key, (row, error) in invalid.items():
        log(f"{row.id}: INVALID: {error}")
        summary.failed[key] = error
        if "@" not in key:  # duplicates would overwrite the first row's record
            manifest.append({"id": row.id, "row": row.index, "status": "invalid", "error": error,
                             "server": None, "prompt_id": None, "files": []})
    to_run = []
    for job in jobs:
        skip, reason = (False, "forced") if force else manifest.done_reason(job.row.id, job.sha, out_dir)
        if skip:
            summary.skipped.append(job.row.id)
        else:
            if reason not in ("new", "forced"):
                log(f"{job.row.id}: running again: {reason}")
            to_run.append(job)
    log(f"{len(to_run)} row(s) to render, {len(summary.skipped)} already done, {len(invalid)} invalid; "
        f"server(s): {', '.join(servers)}")

    bar = _progress_bar(len(to_run)) if progress and to_run else None

    def _log(message: str) -> None:
        (bar.write(message, file=sys.stderr) if bar else log(message))

    board = _JobBoard(to_run)
    cancel = threading.Event()
    runner = _Runner(board, manifest, out_dir, summary, _log if bar and log is _default_log else log,
                     (lambda: bar.update(1)) if bar else (lambda: None), job_timeout=job_timeout,
                     poll_interval=poll_interval, retry_delay=retry_delay, include_temp=include_temp,
                     cancel=cancel)
    states = [_Server(ComfyClient(s, http_timeout), dead_after) for s in servers]
    for state in states:
        summary.per_server[state.client.server] = state.stats
    threads = [threading.Thread(target=runner.work, args=(s,), daemon=True, name=f"queue:{s.client.server}")
               for s in states]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timed join keeps Ctrl+C responsive
    except KeyboardInterrupt:
        cancel.set()  # workers drop their job between requests; files written so far are complete
        raise
    finally:
        if bar:
            bar.close()

    # Jobs still queued here had every server die under them.
    leftover = board.drain()
    if leftover:
        reasons = "; ".join(f"{s.client.server}: {s.dead}" for s in states if s.dead)
        for job in leftover:
            runner._finish(job, None, "failed", error=f"all servers are dead ({reasons})")
    summary.elapsed = time.monotonic() - started
    return summary


def _progress_bar(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Command line


def dry_run(workflow: Mapping[str, Any], rows: Sequence[Row], out_dir: str | None, force: bool,
            stream=None) -> int:
    """Print one JSON line per row that would be submitted; report invalid rows; no network."""
    stream = stream or sys.stdout
    jobs, invalid = prepare_jobs(workflow, rows)
    manifest = Manifest(out_dir) if out_dir and os.path.isdir(out_dir) else None
    skipped = 0
    for job in jobs:
        if manifest and not force:
            skip, reason = manifest.done_reason(job.row.id, job.sha, out_dir)
            if skip:
                skipped += 1
                print(f"{job.row.id}: would skip, {reason}", file=sys.stderr)
                continue
        print(json.dumps({"id": job.row.id, "overrides": job.overrides, "prompt": job.prompt}), file=stream)
    for row, error in invalid.values():
        print(f"{row.id}: INVALID: {error}", file=sys.stderr)
    print(f"dry run: {len(jobs) - skipped} row(s) would be submitted, {skipped} skipped, "
          f"{len(invalid)} invalid", file=sys.stderr)
    return 1 if invalid else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m comfy_queue",
        description="Render one API-format ComfyUI workflow once per row of overrides, over one or more servers.",
    )
    p.add_argument("workflow", help="API-format workflow JSON (ComfyUI: Workflow > Export (API))")
    p.add_argument("rows", help="JSONL (.jsonl/.ndjson/.json list) or CSV (.csv/.tsv) of node_id.input overrides")
    p.add_argument("--out", help="output folder (files + manifest.jsonl); required unless --dry-run")
    p.add_argument("--server", action="append", metavar="URL",
                   help=f"ComfyUI server, repeat for several (default {DEFAULT_SERVER})")
    p.add_argument("--force", action="store_true", help="render rows again even if the manifest says done")
    p.add_argument("--dry-run", action="store_true", help="validate rows and print the prompts as JSONL; no network")
    p.add_argument("--job-timeout", type=float, default=0, metavar="S",
                   help="fail a row that has no result this many seconds after submission (default: no limit)")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help="seconds between /history polls")
    p.add_argument("--http-timeout", type=float, default=30.0, metavar="S", help="timeout of one HTTP request")
    p.add_argument("--dead-after", type=int, default=3, metavar="N",
                   help="consecutive connection failures before a server is marked dead (default 3)")
    p.add_argument("--no-temp", action="store_true", help="do not download temp outputs (PreviewImage)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 some row failed, 2 bad input, 130 Ctrl+C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dry_run and not args.out:
        parser.error("--out DIR is required (or use --dry-run)")
    try:
        workflow = load_workflow(args.workflow)
        rows = load_rows(args.rows)
    except (OSError, QueueError, UnicodeDecodeError, csv.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(workflow, rows, args.out, args.force)
    try:
        summary = run_queue(
            workflow, rows, args.server or [DEFAULT_SERVER], args.out,
            force=args.force, job_timeout=args.job_timeout or None, poll_interval=args.poll_interval,
            http_timeout=args.http_timeout, dead_after=args.dead_after, include_temp=not args.no_temp,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("interrupted; finished rows are in the manifest, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (OSError, QueueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.ok else 1

