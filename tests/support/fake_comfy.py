"""A fake ComfyUI server on 127.0.0.1 (ephemeral port) and helpers for the comfy_queue tests."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from comfy_queue.manifest import MANIFEST_NAME

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

    Hostile modes (each bounded, so a test can never hang on the server side):
    trickle: {path prefix: "body" | "headers"}: answer that route one byte every ``trickle_delay``
      seconds, in the body (after headers announcing a large Content-Length) or already in the headers.
    view_bytes: /view answers that many bytes instead of the stored file (Content-Length sent only
      when ``view_length`` is True).
    outputs: ``f(prompt_id, prompt) -> history outputs`` replacing the SaveImage outputs; every file
      it names is served by /view with its name as content.
    """

    def __init__(self, name, pending_polls=2, die_after=None, forget=(), trickle=None, trickle_delay=0.02,
                 view_bytes=None, view_length=True, outputs=None):
        self.name = name
        self.trickle = dict(trickle or {})
        self.trickle_delay = trickle_delay
        self.view_bytes = view_bytes
        self.view_length = view_length
        self.outputs = outputs
        self.trickled = 0  # bytes sent by trickling routes
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
        for prefix, mode in self.trickle.items():
            if path.startswith(prefix):
                return self._trickle(h, mode)
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
        if method == "GET" and path == "/view" and self.view_bytes is not None:
            return self._send_bytes(h, self.view_bytes)
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

    def _trickle(self, h, mode):
        """Send an endless answer one byte at a time, until the client hangs up (or 60 s pass)."""
        if mode == "body":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(10**6))
            h.end_headers()
            stream = b"x" * 10**6
        else:
            stream = b"HTTP/1.0 200 OK\r\nX-Pad: " + b"x" * 10**6
        give_up = time.monotonic() + 60
        try:
            for byte in stream:
                if self._stopped or time.monotonic() > give_up:
                    return
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                with self.lock:
                    self.trickled += 1
                time.sleep(self.trickle_delay)
        except OSError:
            return  # the client gave up: that is what the tests want
        finally:
            h.close_connection = True

    def _send_bytes(self, h, size):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        if self.view_length:
            h.send_header("Content-Length", str(size))
        h.end_headers()
        chunk = PNG + b"\0" * (2**16 - len(PNG))
        try:
            while size > 0 and not self._stopped:
                h.wfile.write(chunk[:size])
                size -= len(chunk)
        except OSError:
            pass
        h.close_connection = True

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
            elif self.outputs is not None:
                outputs = self.outputs(pid, prompt)
                for node_out in outputs.values():
                    for item in node_out.get("images", []):
                        key = (item["filename"], item.get("subfolder", ""), item.get("type", "output"))
                        self.files[key] = PNG + json.dumps({"file": list(key)}).encode()
                entry = {"outputs": outputs, "status": {"status_str": "success", "completed": True, "messages": []}}
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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_workflow(tmp_path, workflow=WORKFLOW):
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(workflow))
    return str(path)


def read_manifest(out, truncated_lines=0):
    records, bad = {}, 0
    for line in (out / MANIFEST_NAME).read_text().splitlines():
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
