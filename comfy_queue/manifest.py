"""``manifest.jsonl`` in the output folder: one JSON record per finished row, last one wins.

Appending whole lines (and fsync-ing them) after a row's files are in place makes the record the
commit point: a crash before it means the row simply runs again.
"""
from __future__ import annotations

import json
import os
import threading

MANIFEST_NAME = "manifest.jsonl"


def _record_files(record: dict) -> list[str] | None:
    files = record.get("files", [])
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return files
    return None


class Manifest:
    """The records of one output folder's manifest, read at start and appended to as rows finish."""

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
                except (ValueError, RecursionError):
                    continue  # a line cut short by a crash (or garbage): that row just runs again
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    self.records[record["id"]] = record

    def held_files(self) -> dict[str, str]:
        """{file name: row id} of every recorded output."""
        return {name: row_id for row_id, record in self.records.items() for name in _record_files(record) or ()}

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8", errors="surrogatepass") as f:
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
        files = _record_files(record)
        if files is None:
            return False, "its manifest record is damaged"
        missing = [f for f in files if not os.path.isfile(os.path.join(out_dir, f))]
        if missing:
            return False, f"{len(missing)} output file(s) missing ({missing[0]}...)"
        return True, f"done on {record.get('server')} ({len(files)} file(s))"
