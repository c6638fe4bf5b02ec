"""comfy_queue: batch-render a ComfyUI API workflow over rows of overrides, on one or more servers.

Standard library only: it talks to ComfyUI over HTTP and needs nothing from ``tbac_core``, so it
works for any workflow (``python -m comfy_queue --help``). Modules, one concept each:

* ``errors``   QueueError and its subclasses (every error raised on purpose)
* ``inputs``   reading the user's files: regular files of bounded size, JSON of bounded depth
* ``rows``     the rows file (JSONL/CSV) -> Row objects; bad rows carry an error and are skipped
* ``workflow`` load/check a workflow, apply ``node_id.input`` overrides, hash the result
* ``client``   ComfyClient: HTTP with a total deadline per request, streamed size-limited downloads
* ``outputs``  output file names (never two outputs on one name) and atomic writes
* ``manifest`` manifest.jsonl, the record of finished rows that makes resume work
* ``board``    the job board, per-server health, the run's Summary
* ``runner``   run_queue: one worker thread per server over a shared job board
* ``cli``      the command line

The package is small and standard-library only, so this face imports its modules eagerly.
"""
from .board import Summary
from .cli import main
from .client import (
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_SERVER,
    ComfyClient,
    normalize_server,
)
from .errors import (
    OverrideError,
    PromptRejected,
    QueueError,
    ResponseTooLarge,
    RowFailed,
    RowsError,
    ServerUnavailable,
    WorkflowError,
)
from .manifest import MANIFEST_NAME, Manifest
from .outputs import atomic_write, output_files
from .rows import Row, load_rows, make_row
from .runner import DEFAULT_JOB_TIMEOUT, prepare_jobs, run_queue
from .workflow import (
    apply_overrides,
    check_workflow,
    coerce_value,
    load_workflow,
    workflow_hash,
)

__all__ = [
    "ComfyClient", "DEFAULT_HTTP_TIMEOUT", "DEFAULT_JOB_TIMEOUT", "DEFAULT_MAX_DOWNLOAD", "DEFAULT_SERVER",
    "MANIFEST_NAME", "Manifest", "OverrideError", "PromptRejected", "QueueError", "ResponseTooLarge", "Row",
    "RowFailed", "RowsError", "ServerUnavailable", "Summary", "WorkflowError", "apply_overrides", "atomic_write",
    "check_workflow", "coerce_value", "load_rows", "load_workflow", "main", "make_row", "normalize_server",
    "output_files", "prepare_jobs", "run_queue", "workflow_hash",
]
