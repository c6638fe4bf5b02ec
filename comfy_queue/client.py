"""A minimal blocking client for one ComfyUI server: ``/prompt``, ``/history``, ``/view``, ``/queue``.

Every request has a TOTAL deadline of ``timeout`` seconds (connect, send, headers and body together,
not per read): a server that trickles its answer a byte at a time is abandoned when it is up. Bodies
are read in chunks with a size limit; downloads go straight to a file object, never whole into memory.
Only the given address is contacted (no environment proxies, no redirects).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Mapping

from .errors import (
    PromptRejected,
    QueueError,
    ResponseTooLarge,
    RowFailed,
    ServerUnavailable,
)

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_HTTP_TIMEOUT = 30.0  # seconds, total per request
DEFAULT_MAX_DOWNLOAD = 2 * 1024**3  # bytes per output file
MAX_JSON_BYTES = 128 * 1024**2  # an API answer (history, queue) larger than this is not ComfyUI's
_CHUNK = 1 << 16


def normalize_server(server: str) -> str:
    """``host:port`` -> ``http://host:port``; no trailing slash."""
    server = server.strip()
    if "://" not in server:
        server = "http://" + server
    return server.rstrip("/")


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


class ComfyClient:
    """One ComfyUI server. Connection-level failures (refused, reset, deadline passed, 502-504) raise
    ServerUnavailable, so callers can decide to try elsewhere; anything the server actually answered
    is returned or raised as a row-level error."""

    def __init__(self, server: str, timeout: float = DEFAULT_HTTP_TIMEOUT):
        self.server = normalize_server(server)
        self.timeout = timeout
        parts = urllib.parse.urlsplit(self.server)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise QueueError(f"server {server!r} is not an address like http://host:port")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._base_path = parts.hostname, port, parts.path.rstrip("/")

    def __repr__(self) -> str:
        return f"ComfyClient({self.server!r})"

    # -- one request -----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, sink: Callable[[bytes], Any] | None = None,
                 limit: int = MAX_JSON_BYTES) -> tuple[int, bytes]:
        """Send one request and read the answer within ``self.timeout`` seconds in total.

        The body goes to ``sink`` chunk by chunk when given (and only for HTTP 200), else it is
        returned. More than ``limit`` bytes raise ResponseTooLarge: another server would send as much.
        """
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        deadline = time.monotonic() + self.timeout
        conn = self._connection_class(self._host, self._port, timeout=self.timeout)
        # The hard stop: at the deadline the socket is shut down, which wakes any blocked read
        # (a trickled status line or header included); the loop below turns that into a timeout.
        watchdog = threading.Timer(self.timeout, _shut_down, args=(conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request(method, self._base_path + path, body=data, headers=headers)
            resp = conn.getresponse()
            if resp.status in (502, 503, 504):  # a proxy in front of a server that is down
                raise ServerUnavailable(f"{self.server}: HTTP {resp.status} for {path}")
            declared = resp.getheader("Content-Length")
            if declared and declared.strip().isdigit() and int(declared) > limit:
                raise ResponseTooLarge(f"{self.server}: {path.split('?')[0]} would send {format_size(int(declared))}, "
                                f"more than the limit of {format_size(limit)}")
            chunks: list[bytes] = []
            write = sink if sink is not None and resp.status == 200 else chunks.append
            received = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("deadline passed while reading the answer")
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise ResponseTooLarge(f"{self.server}: {path.split('?')[0]} sent more than the limit of "
                                    f"{format_size(limit)}")
                write(chunk)
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline passed while reading the answer")
            if declared and declared.strip().isdigit() and received != int(declared):
                raise ConnectionError(f"connection closed after {received} of {declared} bytes")
            return resp.status, b"".join(chunks)
        except (ServerUnavailable, RowFailed):
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, timeout, bad answer
            if time.monotonic() >= deadline or isinstance(e, TimeoutError):
                raise ServerUnavailable(f"{self.server}: no complete answer to {path.split('?')[0]} within "
                                        f"{self.timeout:g}s (--http-timeout, total per request)") from None
            reason = getattr(e, "reason", None) or e
            raise ServerUnavailable(f"{self.server}: {type(e).__name__}: {reason}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, payload = self._request(method, path, body)
        try:
            return status, json.loads(payload or b"null")
        except (ValueError, RecursionError):
            if status == 200:
                # A 200 that is not JSON: this is not a ComfyUI API (wrong port, login page...).
                raise ServerUnavailable(f"{self.server}: {path} did not answer JSON; is this a ComfyUI server?")
            return status, payload.decode("utf-8", "replace")

    # -- the API ---------------------------------------------------------------------------

    def submit(self, workflow: Mapping[str, Any], client_id: str = "") -> dict:
        """POST /prompt; return ComfyUI's answer (``prompt_id``, ``number``, ``node_errors``).

        Raises PromptRejected with the node errors spelled out when ComfyUI answers 400.
        """
        status, data = self._json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        if status == 200 and isinstance(data, dict) and isinstance(data.get("prompt_id"), (str, int)) \
                and data["prompt_id"] != "":
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
            items = items if isinstance(items, list) else ()
            return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}

        return ids(data.get("queue_running")), ids(data.get("queue_pending"))

    def download(self, filename: str, subfolder: str, type: str, write: Callable[[bytes], Any],
                 max_bytes: int = DEFAULT_MAX_DOWNLOAD) -> None:
        """GET /view, handing the file to ``write`` chunk by chunk (at most ``max_bytes`` of it)."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, _ = self._request("GET", "/view?" + query, sink=write, limit=max_bytes)
        if status != 200:
            raise RowFailed(f"{self.server}: /view of {subfolder + '/' if subfolder else ''}{filename} "
                            f"({type}) answered HTTP {status}")

    def view(self, filename: str, subfolder: str = "", type: str = "output",
             max_bytes: int = DEFAULT_MAX_DOWNLOAD) -> bytes:
        """GET /view: the bytes of one output file (for small files; the runner streams to disk)."""
        chunks: list[bytes] = []
        self.download(filename, subfolder, type, chunks.append, max_bytes)
        return b"".join(chunks)

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


def _shut_down(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def format_prompt_error(data: Any) -> str:
    """One line per problem of a /prompt 400 answer: node id, class_type, message, details."""
    if not isinstance(data, dict):
        return f"ComfyUI rejected the prompt: {str(data)[:500]}"
    parts = []
    node_errors = data.get("node_errors") or {}
    for node_id, info in node_errors.items() if isinstance(node_errors, dict) else ():
        info = info if isinstance(info, dict) else {}
        class_type = info.get("class_type", "?")
        errors = info.get("errors")
        for err in errors if isinstance(errors, list) and errors else [{}]:
            err = err if isinstance(err, dict) else {"message": str(err)[:200]}
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
            parts.insert(0, str(error)[:500])
    return "ComfyUI rejected the prompt: " + ("; ".join(parts) or "no reason given")


def describe_execution_error(status: Any) -> str:
    """Turn a failed history entry's status messages into one readable line."""
    status = status if isinstance(status, dict) else {}
    messages = status.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not (isinstance(message, list) and len(message) == 2):
            continue
        event, info = message
        info = info if isinstance(info, dict) else {}
        where = f"node {info.get('node_id', '?')} ({info.get('node_type', '?')})"
        if event == "execution_error":
            kind = info.get("exception_type") or "error"
            return f"execution failed at {where}: {kind}: {str(info.get('exception_message', '')).strip()}"
        if event == "execution_interrupted":
            return f"execution was interrupted at {where}"
    return f"execution failed (status {status.get('status_str', 'unknown')!r}, no error message)"
