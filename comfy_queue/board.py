"""The shared state of a batch run: the job board the worker threads pull from, each server's
health, and the summary of what the run did."""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Iterable

from .client import ComfyClient
from .rows import Row


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
class Job:
    row: Row
    prompt: dict
    sha: str
    overrides: dict
    lost: int = 0  # times a server forgot the prompt (restart) and it was resubmitted


class JobBoard:
    """The shared job queue. Jobs may come back (their server died), so "empty" is not "finished":
    workers wait until a job is available or no job is unfinished."""

    def __init__(self, jobs: Iterable[Job]):
        self._cond = threading.Condition()
        self._jobs = collections.deque(jobs)
        self._unfinished = len(self._jobs)

    def take(self, should_stop: Callable[[], bool]) -> Job | None:
        with self._cond:
            while True:
                if self._unfinished == 0 or should_stop():
                    return None
                if self._jobs:
                    return self._jobs.popleft()
                self._cond.wait(0.1)

    def put_back(self, job: Job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()

    def drain(self) -> list[Job]:
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs


class ServerHealth:
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
