"""Running a batch: one worker thread per server pulling jobs from one shared board.

A server that fails ``dead_after`` consecutive requests at the connection level (refused, reset,
deadline passed, 502-504) is marked dead and the job it was working on goes back to the board for
the other servers. Rows rejected by ComfyUI (HTTP 400 node errors) or failing while executing are
reported and the batch goes on.

Every wait is bounded: each HTTP request by ``http_timeout`` seconds in total, each job by
``job_timeout`` seconds from its first submission until its result is in the history (the prompt is
then removed from the server's queue or interrupted), each download by ``max_download`` bytes.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

from .board import Job, JobBoard, ServerHealth, Summary
from .client import (
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_MAX_DOWNLOAD,
    ComfyClient,
    describe_execution_error,
    format_prompt_error,
    normalize_server,
)
from .errors import (
    PromptRejected,
    QueueError,
    ResponseTooLarge,
    RowFailed,
    ServerUnavailable,
)
from .manifest import Manifest
from .outputs import OutputNames, atomic_writer, output_files
from .rows import Row, make_row
from .workflow import apply_row_overrides, check_workflow, workflow_hash

DEFAULT_JOB_TIMEOUT = 3600.0  # seconds from submission to result; a long video render may need more
# ComfyUI forgets queued prompts when it restarts; every this many empty /history polls we look
# at /queue to notice a prompt that will never finish instead of waiting for it forever.
QUEUE_CHECK_EVERY = 5
MAX_LOST_RESUBMITS = 2


class _ServerDead(QueueError):
    """Internal: the worker's server was declared dead; its current job must move elsewhere."""


class _PromptLost(QueueError):
    """Internal: the server no longer knows the prompt (it restarted); submit the job again."""


class _Cancelled(QueueError):
    """Internal: the run was interrupted (Ctrl+C)."""


class _Runner:
    """Shared state of one run_queue call; each server gets a thread running ``work``."""

    def __init__(self, board, manifest, out_dir, summary, log, progress, *, job_timeout, poll_interval,
                 retry_delay, include_temp, max_download, cancel):
        self.board = board
        self.manifest = manifest
        self.names = OutputNames(manifest.held_files())
        self.out_dir = out_dir
        self.summary = summary
        self.log = log
        self.progress = progress
        self.job_timeout = job_timeout
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.include_temp = include_temp
        self.max_download = max_download
        self.cancel = cancel
        self.client_id = f"tbac-queue-{uuid.uuid4().hex[:12]}"
        self.lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(max(0.0, seconds)):
            raise _Cancelled()

    def _call(self, server: ServerHealth, fn: Callable[[], Any]) -> Any:
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

    def _finish(self, job: Job, server: ServerHealth | None, status: str, *, prompt_id=None, files=(),
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

    def work(self, server: ServerHealth) -> None:
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

    def _run_job(self, server: ServerHealth, job: Job) -> tuple[str, list[str]]:
        client = server.client
        deadline = time.monotonic() + self.job_timeout  # one budget for the job, resubmissions included
        while True:
            answer = self._call(server, lambda: client.submit(job.prompt, self.client_id))
            prompt_id = str(answer["prompt_id"])
            if answer.get("node_errors"):
                # 200 with node errors: ComfyUI runs the outputs that validated and drops the rest.
                self.log(f"{job.row.id}: warning, some outputs were dropped: "
                         f"{format_prompt_error({'node_errors': answer['node_errors']})}")
            try:
                entry = self._wait(server, prompt_id, deadline)
                break
            except _PromptLost:
                job.lost += 1
                if job.lost > MAX_LOST_RESUBMITS:
                    raise RowFailed(f"{client.server} lost the prompt {job.lost} times (restarting?)", prompt_id)
                self.log(f"{job.row.id}: {client.server} no longer knows prompt {prompt_id} "
                         f"(restarted?); submitting it again")
        status = entry.get("status")
        status = status if isinstance(status, dict) else {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            raise RowFailed(describe_execution_error(status), prompt_id)
        files = []
        for name, filename, subfolder, file_type in output_files(entry.get("outputs") or {}, job.row.id,
                                                                 self.include_temp):
            name = self.names.claim(name, job.row.id)
            path = os.path.join(self.out_dir, name)
            try:
                self._call(server, lambda: self._download(client, filename, subfolder, file_type, path))
            except ResponseTooLarge as e:
                raise RowFailed(f"{e} (--max-download)", prompt_id) from None
            except RowFailed as e:
                raise RowFailed(str(e), prompt_id) from None
            files.append(name)
        return prompt_id, files

    def _download(self, client: ComfyClient, filename: str, subfolder: str, file_type: str, path: str) -> None:
        """Stream one output into ``path``; a failed attempt leaves no file (and no ``.part``) behind."""
        with atomic_writer(path) as f:
            client.download(filename, subfolder, file_type, f.write, self.max_download)

    def _wait(self, server: ServerHealth, prompt_id: str, deadline: float) -> dict:
        """Poll /history until the prompt is there; detect lost prompts and the job deadline."""
        client = server.client
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
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                client.cancel(prompt_id)
                raise RowFailed(f"no result from {client.server} after {self.job_timeout:g}s (--job-timeout); "
                                f"the prompt was removed from its queue or interrupted", prompt_id)
            self._sleep(min(self.poll_interval, remaining))


def _default_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_jobs(workflow: Mapping[str, Any], rows: Iterable[Row | Mapping[str, Any]]):
    """Validate every row up front. Returns (jobs, {row_id: (row, error)}) so bad rows never reach a server."""
    jobs: list[Job] = []
    invalid: dict[str, tuple[Row, str]] = {}
    seen: dict[str, Row] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Row):
            if not isinstance(row, Mapping):
                row = Row(i, f"row{i:04d}", {}, error=f"a row must be an object, got {type(row).__name__}")
            else:
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
        prompt, applied, errors = apply_row_overrides(workflow, row.overrides, row.text)
        if errors:
            invalid[row.id] = (row, "; ".join(errors) + where)
            continue
        jobs.append(Job(row, prompt, workflow_hash(prompt), applied))
    return jobs, invalid


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise QueueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return float(value)


def run_queue(
    workflow: Mapping[str, Any],
    rows: Iterable[Row | Mapping[str, Any]],
    servers: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    job_timeout: float = DEFAULT_JOB_TIMEOUT,
    poll_interval: float = 1.0,
    http_timeout: float = DEFAULT_HTTP_TIMEOUT,
    dead_after: int = 3,
    retry_delay: float = 1.0,
    include_temp: bool = True,
    max_download: int = DEFAULT_MAX_DOWNLOAD,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Render every row on ``servers`` into ``out_dir`` and return a Summary (see the module doc).

    Rows are validated first; invalid rows fail without being submitted. Rows already done
    according to the manifest are skipped unless ``force``.
    """
    started = time.monotonic()
    job_timeout = _check_positive("job_timeout", job_timeout)
    http_timeout = _check_positive("http_timeout", http_timeout)
    poll_interval = _check_positive("poll_interval", poll_interval)
    if isinstance(max_download, bool) or not isinstance(max_download, int) or max_download <= 0:
        raise QueueError(f"max_download must be a positive number of bytes, got {max_download!r}")
    workflow = check_workflow(workflow)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log = log or _default_log
    servers = list(dict.fromkeys(normalize_server(s) for s in servers))
    if not servers:
        raise QueueError("no server given")
    clients = [ComfyClient(s, http_timeout) for s in servers]  # refuses malformed addresses up front
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

    board = JobBoard(to_run)
    cancel = threading.Event()
    runner = _Runner(board, manifest, out_dir, summary, _log if bar and log is _default_log else log,
                     (lambda: bar.update(1)) if bar else (lambda: None), job_timeout=job_timeout,
                     poll_interval=poll_interval, retry_delay=retry_delay, include_temp=include_temp,
                     max_download=max_download, cancel=cancel)
    states = [ServerHealth(client, dead_after) for client in clients]
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
