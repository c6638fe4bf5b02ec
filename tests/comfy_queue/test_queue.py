"""Tests of comfy_queue against small fake ComfyUI servers on 127.0.0.1 (ephemeral ports)."""
from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

import comfy_queue.runner as q

FAST = dict(poll_interval=0.01, retry_delay=0.01, progress=False)

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tbac.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tbac", "images": ["8", 0]}},
    "10": {"class_type": "TBACOptions", "inputs": {"tiled_vae": False}},
}
KNOWN_CLASSES = {node["class_type"] for node in WORKFLOW.values()}
PNG = b"\x89PNG\r\n\x1a\n"


class FakeComfy:
    """Just enough of ComfyUI's HTTP API: /prompt, /history, /view, /queue, /interrupt (+ /api/...).

    pending_polls: /history answers {} that many times per prompt before the result.
    die_after: after accepting that many prompts, drop every connection and shut down.
    forget: 1-based numbers of accepted prompts the server "loses" (as if it restarted).
    A CLIPTextEncode text containing BAD is rejected with node errors; seed 666 fails at execution.
    """

    def __init__(self, name, pending_polls=2, die_after=None, forget=()):
        self.name = name
        self.pending_polls = pending_polls
        self.die_after = die_after
        self.forget = set(forget)
        self.prompts: list[tuple[str, dict]] = []  # accepted (prompt_id, prompt)
        self.posts = 0
        self.remaining: dict[str, int] = {}
        self.results: dict[str, dict] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.deleted: list[str] = []
        self.interrupted: list[str] = []
        self.dead = False
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self):
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()

    def seeds(self):
        return [p["3"]["inputs"]["seed"] for _, p in self.prompts]

    # -- request handling --------------------------------------------------------------------

    def _handle(self, h, method):
        if self.dead:
            h.close_connection = True  # no answer at all: the client sees the connection drop
            return
        url = urlparse(h.path)
        path = url.path[4:] if url.path.startswith("/api/") else url.path
        body = None
        if method == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length) or b"null")
        if method == "POST" and path == "/prompt":
            return self._prompt(h, body)
        if method == "GET" and path.startswith("/history/"):
            return self._send(h, 200, self._history(path[len("/history/"):]))
        if method == "GET" and path == "/queue":
            with self.lock:
                running = [[i, pid, {}, {}, []] for i, pid in enumerate(self.remaining)]
            return self._send(h, 200, {"queue_running": running, "queue_pending": []})
        if method == "POST" and path == "/queue":
            with self.lock:
                for pid in body.get("delete", []):
                    self.deleted.append(pid)
                    self.remaining.pop(pid, None)
            return self._send(h, 200, {})
        if method == "POST" and path == "/interrupt":
            with self.lock:
                self.interrupted.append(body.get("prompt_id"))
            return self._send(h, 200, {})
        if method == "GET" and path == "/view":
            qs = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            data = self.files.get((qs.get("filename"), qs.get("subfolder", ""), qs.get("type", "output")))
            if data is None:
                return self._send(h, 404, {"error": "not found"})
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        self._send(h, 404, {"error": f"no route {method} {path}"})

    def _send(self, h, status, payload):
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _prompt(self, h, body):
        prompt = body["prompt"]
        node_errors = {}
        for nid, node in prompt.items():
            errors = []
            if node.get("class_type") not in KNOWN_CLASSES:
                errors.append({"type": "invalid_prompt", "message": "Cannot execute because node does not exist",
                               "details": node.get("class_type")})
            for name, value in node.get("inputs", {}).items():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                    errors.append({"type": "bad_link", "message": "Linked node not found", "details": name})
                if node["class_type"] == "CLIPTextEncode" and name == "text" and "BAD" in str(value):
                    errors.append({"type": "value_not_allowed", "message": "Value not allowed",
                                   "details": f"text: {value!r} contains a forbidden word"})
            if errors:
                node_errors[nid] = {"errors": errors, "dependent_outputs": ["9"], "class_type": node.get("class_type")}
        if node_errors:
            return self._send(h, 400, {
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": node_errors})
        with self.lock:
            pid = str(uuid.uuid4())
            self.prompts.append((pid, prompt))
            number = len(self.prompts)
            if number not in self.forget:
                self.remaining[pid] = self.pending_polls
            dying = self.die_after is not None and number >= self.die_after
        self._send(h, 200, {"prompt_id": pid, "number": number, "node_errors": {}})
        if dying:
            self.dead = True
            threading.Thread(target=self.stop, daemon=True).start()

    def _history(self, pid):
        with self.lock:
            if pid in self.results:
                return {pid: self.results[pid]}
            if pid not in self.remaining:
                return {}
            if self.remaining[pid] > 0:
                self.remaining[pid] -= 1
                return {}
            del self.remaining[pid]
            prompt = dict(self.prompts)[pid]
            seed = prompt["3"]["inputs"]["seed"]
            if seed == 666:
                entry = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
                    ["execution_start", {"prompt_id": pid}],
                    ["execution_error", {"prompt_id": pid, "node_id": "3", "node_type": "KSampler",
                                         "exception_message": "CUDA out of memory",
                                         "exception_type": "torch.OutOfMemoryError", "traceback": []}]]}}
            else:
                images = []
                for i in range(prompt["5"]["inputs"]["batch_size"]):
                    name = f"{prompt['9']['inputs']['filename_prefix']}_{len(self.files) + 1:05d}_.png"
                    content = {"server": self.name, "seed": seed, "text": prompt["6"]["inputs"]["text"], "i": i}
                    self.files[(name, "", "output")] = PNG + json.dumps(content).encode()
                    images.append({"filename": name, "subfolder": "", "type": "output"})
                entry = {"outputs": {"9": {"images": images}},
                         "status": {"status_str": "success", "completed": True, "messages": []}}
            self.results[pid] = entry
            return {pid: entry}


@pytest.fixture
def fake():
    servers = []

    def make(name="a", **kwargs):
        server = FakeComfy(name, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_workflow(tmp_path, workflow=WORKFLOW):
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(workflow))
    return str(path)


def read_manifest(out, truncated_lines=0):
    records, bad = {}, 0
    for line in (out / q.MANIFEST_NAME).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        records[record["id"]] = record
    assert bad == truncated_lines
    return records


def content(path):
    data = path.read_bytes()
    assert data.startswith(PNG)
    return json.loads(data[len(PNG):])


# ------------------------------------------------------------------------------------------------


def test_batch_over_two_servers_downloads_files(tmp_path, fake, capsys):
    a, b = fake("a"), fake("b")
    rows = [{"id": f"cat{i}", "3.seed": i, "6.text": f"cat {i}"} for i in range(1, 7)]
    rows[1]["5.batch_size"] = 2
    out = tmp_path / "out"
    rc = q.main([write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--out", str(out),
                 "--server", a.url, "--server", b.url + "/api/", "--poll-interval", "0.01", "--no-progress"])
    assert rc == 0
    assert a.prompts and b.prompts, "work should be spread over both servers"
    assert sorted(a.seeds() + b.seeds()) == [1, 2, 3, 4, 5, 6]
    manifest = read_manifest(out)
    for i in range(1, 7):
        record = manifest[f"cat{i}"]
        assert record["status"] == "done"
        server = a if i in a.seeds() else b
        assert record["server"] == server.url + ("" if server is a else "/api")
        expected = [f"cat{i}_9_0.png"] + ([f"cat{i}_9_1.png"] if i == 2 else [])
        assert record["files"] == expected
        for n, name in enumerate(expected):
            assert content(out / name) == {"server": server.name, "seed": i, "text": f"cat {i}", "i": n}
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    summary = capsys.readouterr().out
    assert "6 done, 0 skipped, 0 failed" in summary
    assert a.url in summary and b.url in summary


def test_rejected_and_failing_rows_are_reported_and_others_finish(tmp_path, fake, capsys):
    a = fake("a")
    rows = [
        {"id": "ok1", "3.seed": 1},
        {"id": "bad", "3.seed": 2, "6.text": "a BAD cat"},
        {"id": "boom", "3.seed": 666},
        {"id": "typo", "99.seed": 3},
        {"id": "ok2", "3.seed": 4},
    ]
    out = tmp_path / "out"
    rc = q.main([write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--out", str(out),
                 "--server", a.url, "--poll-interval", "0.01", "--no-progress"])
    assert rc == 1
    assert (out / "ok1_9_0.png").exists() and (out / "ok2_9_0.png").exists()
    assert sorted(a.seeds()) == [1, 4, 666], "the row with an unknown node must never be submitted"
    captured = capsys.readouterr()
    assert "2 done, 0 skipped, 3 failed" in captured.out
    assert "node 6 (CLIPTextEncode): Value not allowed" in captured.out and "forbidden word" in captured.out
    assert "node 3 (KSampler)" in captured.out and "CUDA out of memory" in captured.out
    assert "unknown node id '99'" in captured.out
    manifest = read_manifest(out)
    assert manifest["bad"]["status"] == "failed" and manifest["boom"]["prompt_id"]
    assert manifest["typo"]["status"] == "invalid"
    assert manifest["ok2"]["status"] == "done"


def test_dead_server_jobs_are_retried_on_the_other(tmp_path, fake):
    a = fake("a", die_after=2)  # finishes one job, accepts a second one and dies while it runs
    b = fake("b")
    rows = [{"id": f"r{i}", "3.seed": i} for i in range(1, 7)]
    logs = []
    summary = q.run_queue(WORKFLOW, rows, [a.url, b.url], tmp_path, dead_after=2, log=logs.append, **FAST)
    assert summary.ok and sorted(summary.done) == [f"r{i}" for i in range(1, 7)]
    assert len(a.prompts) == 2
    lost_seed = a.seeds()[1]
    assert lost_seed in b.seeds(), "the job in flight on the dead server must be rendered by the other"
    stats_a, stats_b = summary.per_server[a.url], summary.per_server[b.url]
    assert stats_a["done"] == 1 and stats_a["handed_off"] == 1 and stats_a["dead"]
    assert stats_b["done"] == 5
    manifest = read_manifest(tmp_path)
    assert manifest[f"r{lost_seed}"]["server"] == b.url
    assert all((tmp_path / f"r{i}_9_0.png").exists() for i in range(1, 7))
    assert any("is dead" in line for line in logs)


def test_all_servers_dead_fails_remaining_rows_clearly(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [{"3.seed": i} for i in range(3)]
    summary = q.run_queue(WORKFLOW, rows, [f"127.0.0.1:{port}"], tmp_path, dead_after=2, log=lambda m: None, **FAST)
    assert not summary.ok and len(summary.failed) == 3
    assert all("all servers are dead" in e for e in summary.failed.values())
    assert "all servers are dead" in summary.format()


def test_resume_skips_done_rows_and_force_reruns(tmp_path, fake, capsys):
    a = fake("a")
    rows = [{"id": f"r{i}", "3.seed": i} for i in range(1, 5)]
    wf, rows_path, out = write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out"
    argv = [wf, rows_path, "--out", str(out), "--server", a.url, "--poll-interval", "0.01", "--no-progress"]
    assert q.main(argv) == 0 and len(a.prompts) == 4

    # a crash while appending left half a line: it is ignored and does not corrupt later records
    with open(out / q.MANIFEST_NAME, "a") as f:
        f.write('{"id": "r1", "status": "fai')
    assert q.main(argv) == 0
    assert len(a.prompts) == 4, "done rows must not be submitted again"
    assert "0 done, 4 skipped, 0 failed" in capsys.readouterr().out

    os.remove(out / "r2_9_0.png")  # a missing output makes its row run again
    rows[2]["6.text"] = "a changed prompt"  # so does an edited row
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert q.main(argv) == 0
    assert a.seeds()[4:] in ([2, 3], [3, 2])
    assert "2 done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "r2_9_0.png").exists()
    read_manifest(out, truncated_lines=1)  # every line except the truncated one still parses
    assert q.main(argv + ["--force"]) == 0
    assert len(a.prompts) == 10


def test_csv_rows_with_type_coercion(tmp_path, fake):
    a = fake("a")
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text(
        "\ufeffid,3.seed,3.cfg,3.denoise,10.tiled_vae,6.text,5.batch_size,_note\n"
        "dog,42,6.5,1,true,\"a dog, running\",,first\n"
        ",7,3,0.5,no,a bird,2,\n"
    )
    rows = q.load_rows(csv_path)
    assert [r.id for r in rows] == ["dog", "row0002"]
    prompt = q.apply_overrides(WORKFLOW, rows[0])
    inputs = prompt["3"]["inputs"]
    assert (inputs["seed"], inputs["cfg"], inputs["denoise"]) == (42, 6.5, 1.0)
    assert type(inputs["seed"]) is int and type(inputs["cfg"]) is float and type(inputs["denoise"]) is float
    assert prompt["10"]["inputs"]["tiled_vae"] is True and prompt["6"]["inputs"]["text"] == "a dog, running"
    assert prompt["5"]["inputs"]["batch_size"] == 1, "an empty cell keeps the workflow's value"
    assert WORKFLOW["3"]["inputs"]["seed"] == 1, "the workflow itself is not modified"

    summary = q.run_queue(WORKFLOW, rows, [a.url], tmp_path / "out", log=lambda m: None, **FAST)
    assert summary.ok
    sent = dict((p["3"]["inputs"]["seed"], p) for _, p in a.prompts)
    assert sent[7]["3"]["inputs"]["cfg"] == 3.0 and isinstance(sent[7]["3"]["inputs"]["cfg"], float)
    assert sent[7]["10"]["inputs"]["tiled_vae"] is False and sent[7]["5"]["inputs"]["batch_size"] == 2
    assert sorted(os.listdir(tmp_path / "out")) == sorted([q.MANIFEST_NAME, "dog_9_0.png", "row0002_9_0.png",
                                                           "row0002_9_1.png"])


def test_jsonl_rows_parsing(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '# comment\n'
        '{"name": "first one", "3.seed": "12", "3.cfg": 5}\n'
        '\n'
        '{"3.seed": 3, "seed": 4}\n'
        'not json\n'
        '{"id": "first_one", "3.seed": 1}\n'
    )
    rows = q.load_rows(path)
    assert [r.id for r in rows] == ["first_one", "row0002", "row0003", "first_one"]
    assert rows[0].overrides == {"3.seed": "12", "3.cfg": 5}
    prompt = q.apply_overrides(WORKFLOW, rows[0])
    assert prompt["3"]["inputs"]["seed"] == 12 and prompt["3"]["inputs"]["cfg"] == 5.0
    assert "'seed' is not of the form node_id.input" in rows[1].error
    assert "invalid JSON" in rows[2].error
    jobs, invalid = q.prepare_jobs(WORKFLOW, rows)
    assert [j.row.id for j in jobs] == ["first_one"]
    assert any("duplicate row id 'first_one'" in error for _, error in invalid.values())


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


def test_dry_run_prints_prompts_without_network(tmp_path, capsys):
    rows = [{"id": "a", "3.seed": "9"}, {"id": "b", "3.seed": 2}]
    argv = [write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--dry-run",
            "--server", "http://127.0.0.1:9"]
    assert q.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    assert lines[0]["overrides"] == {"3.seed": 9} and lines[0]["prompt"]["3"]["inputs"]["seed"] == 9
    rows.append({"id": "c", "3.nope": 1})
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert q.main(argv) == 1
    assert "c: INVALID: 3.nope" in capsys.readouterr().err


def test_job_timeout_fails_row_and_cancels_it(tmp_path, fake):
    a = fake("a", pending_polls=10**6)
    summary = q.run_queue(WORKFLOW, [{"id": "slow"}], [a.url], tmp_path, job_timeout=0.2,
                          log=lambda m: None, **FAST)
    assert "no result" in summary.failed["slow"] and "--job-timeout" in summary.failed["slow"]
    assert a.interrupted == [a.prompts[0][0]]


def test_prompt_lost_by_a_restarted_server_is_submitted_again(tmp_path, fake):
    a = fake("a", forget={1})
    summary = q.run_queue(WORKFLOW, [{"id": "x", "3.seed": 5}], [a.url], tmp_path, log=lambda m: None, **FAST)
    assert summary.ok and a.seeds() == [5, 5]
    assert (tmp_path / "x_9_0.png").exists()


def test_workflow_loading_and_atomic_write(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(q.WorkflowError, match="Export \\(API\\)"):
        q.load_workflow(ui)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": WORKFLOW, "client_id": "x"}))
    assert q.load_workflow(wrapped) == WORKFLOW

    target = tmp_path / "f.png"
    with pytest.raises(TypeError):
        q.atomic_write(str(target), "not bytes")  # fails mid-write
    assert sorted(os.listdir(tmp_path)) == ["ui.json", "wrapped.json"], "no target and no temp file left behind"
    q.atomic_write(str(target), b"data")
    assert target.read_bytes() == b"data"
