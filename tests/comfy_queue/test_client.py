"""ComfyClient against fake servers on 127.0.0.1: total deadlines, size limits, odd answers."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fake_comfy import PNG

import comfy_queue as q
from comfy_queue.client import describe_execution_error


def test_trickling_view_body_is_abandoned_at_the_total_http_timeout(fake):
    a = fake("a", trickle={"/view": "body"}, trickle_delay=0.01)
    client = q.ComfyClient(a.url, timeout=0.5)
    chunks = []
    started = time.monotonic()
    with pytest.raises(q.ServerUnavailable, match="within 0.5s"):
        client.download("x.png", "", "output", chunks.append)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, "the deadline is total, not per read"
    assert a.trickled >= 5 and sum(map(len, chunks)) >= 5, "bytes were arriving all along"


@pytest.mark.parametrize("route, call", [
    ("/history", lambda c: c.history("p1")),
    ("/prompt", lambda c: c.submit({"1": {"class_type": "X", "inputs": {}}})),
    ("/queue", lambda c: c.queue()),
])
def test_trickling_headers_hit_the_total_deadline_on_every_route(fake, route, call):
    a = fake("a", trickle={route: "headers"}, trickle_delay=0.01)
    client = q.ComfyClient(a.url, timeout=0.4)
    started = time.monotonic()
    with pytest.raises(q.ServerUnavailable, match="--http-timeout"):
        call(client)
    assert time.monotonic() - started < 2.0
    assert a.trickled >= 5


def test_silent_server_times_out(tmp_path):
    """A server that accepts the connection and never answers: the socket timeout, bounded too."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = q.ComfyClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(q.ServerUnavailable):
            client.history("p")
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("declare_length", [True, False])
def test_download_over_the_size_limit_is_refused(fake, declare_length):
    a = fake("a", view_bytes=5 * 2**20, view_length=declare_length)
    client = q.ComfyClient(a.url, timeout=10)
    received = []
    with pytest.raises(q.ResponseTooLarge, match="limit of 1 MiB"):
        client.download("big.png", "", "output", received.append, max_bytes=2**20)
    assert sum(map(len, received)) <= 2**20, "never more than the limit is handed on"
    assert client.view("big.png", max_bytes=8 * 2**20)[:len(PNG)] == PNG


def test_download_is_streamed_in_chunks(fake):
    a = fake("a", view_bytes=3 * 2**20)
    chunks = []
    q.ComfyClient(a.url).download("f.png", "", "output", chunks.append)
    assert sum(map(len, chunks)) == 3 * 2**20
    assert len(chunks) > 1 and max(map(len, chunks)) <= 2**16, "the body is never held whole"


class _OneAnswer:
    """A server answering every GET with one fixed raw body (status 200, JSON content type)."""

    def __init__(self, body: bytes, headers=()):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("body, headers, message", [
    (b"[" * 100_000 + b"]" * 100_000, (), "did not answer JSON"),  # deeper than json's recursion limit
    (b"<html>login</html>", (), "did not answer JSON"),
    (b'{"p": 1}', (("Content-Length", "50"),), "ConnectionError"),  # cut short
    (b"{}", (("Content-Length", str(10**12)),), "limit"),
])
def test_odd_answers_are_queue_errors(body, headers, message):
    server = _OneAnswer(body, headers)
    try:
        with pytest.raises(q.QueueError, match=message):
            q.ComfyClient(server.url, timeout=2).history("p")
    finally:
        server.close()


@pytest.mark.parametrize("answer", [{"p": [1]}, {"p": "text"}, {}])
def test_history_entries_of_the_wrong_type_mean_not_finished(answer):
    server = _OneAnswer(json.dumps(answer).encode())
    try:
        assert q.ComfyClient(server.url, timeout=2).history("p") is None
    finally:
        server.close()


def test_a_history_that_is_no_object_is_a_server_problem():
    server = _OneAnswer(b"[1, 2]")
    try:
        with pytest.raises(q.ServerUnavailable, match="/history"):
            q.ComfyClient(server.url, timeout=2).history("p")
    finally:
        server.close()


@pytest.mark.parametrize("address", ["ftp://host:1", "http://", "http://host:notaport", "http://host:99999"])
def test_malformed_server_addresses_are_refused(address):
    with pytest.raises(q.QueueError, match="not an address"):
        q.ComfyClient(address)


@pytest.mark.parametrize("status", [
    None, [], "x", {"messages": "x"}, {"messages": [1, [2], ["execution_error", "x"]]},
    {"messages": [["execution_error", {"node_id": 3, "exception_message": None}]]},
])
def test_describe_execution_error_takes_any_shape(status):
    assert describe_execution_error(status).startswith("execution")
