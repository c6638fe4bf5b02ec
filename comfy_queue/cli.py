"""``python -m comfy_queue``: render one API-format workflow once per row of overrides.

Usage::

    python -m comfy_queue workflow_api.json rows.jsonl --out renders/ \\
        --server http://gpu1:8188 --server http://gpu2:8188 [--job-timeout 3600] [--force] [--dry-run]

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

The exit status is 0 when every row is done, 1 if any row failed, 2 for unusable arguments or
files, 130 after Ctrl+C. Only the Python standard library is used, and only the given server
addresses are contacted (environment proxies are ignored on purpose). ``tqdm`` draws a progress bar
when it is installed and stderr is a terminal.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

from .client import (
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_SERVER,
    format_size,
)
from .errors import QueueError
from .manifest import Manifest
from .rows import Row, load_rows
from .runner import DEFAULT_JOB_TIMEOUT, prepare_jobs, run_queue
from .workflow import load_workflow

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"2G"``, ``"500MiB"``, ``"1048576"`` -> bytes (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or not unit or int(float(match.group(1)) * unit) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size like 2G, 500M or 1048576")
    return int(float(match.group(1)) * unit)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


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
    p.add_argument("--job-timeout", type=positive_seconds, default=DEFAULT_JOB_TIMEOUT, metavar="S",
                   help="fail a row that has no result this many seconds after its submission; the prompt is "
                        f"removed from the server's queue or interrupted (default {DEFAULT_JOB_TIMEOUT:g})")
    p.add_argument("--poll-interval", type=positive_seconds, default=1.0, metavar="S",
                   help="seconds between /history polls (default 1)")
    p.add_argument("--http-timeout", type=positive_seconds, default=DEFAULT_HTTP_TIMEOUT, metavar="S",
                   help="total time one HTTP request may take, answer and download included "
                        f"(default {DEFAULT_HTTP_TIMEOUT:g})")
    p.add_argument("--max-download", type=parse_size, default=DEFAULT_MAX_DOWNLOAD, metavar="SIZE",
                   help=f"largest output file to download, e.g. 500M or 4G (default {format_size(DEFAULT_MAX_DOWNLOAD)})")
    p.add_argument("--dead-after", type=positive_int, default=3, metavar="N",
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
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(workflow, rows, args.out, args.force)
    try:
        summary = run_queue(
            workflow, rows, args.server or [DEFAULT_SERVER], args.out,
            force=args.force, job_timeout=args.job_timeout, poll_interval=args.poll_interval,
            http_timeout=args.http_timeout, dead_after=args.dead_after, include_temp=not args.no_temp,
            max_download=args.max_download, progress=not args.no_progress,
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
