"""The errors comfy_queue raises on purpose: every one is a QueueError with a message that says what
was wrong, where, and what is allowed. Anything else escaping the package is a bug."""
from __future__ import annotations

from typing import Any, Sequence


class QueueError(Exception):
    """Base class of the errors this package raises on purpose."""


class WorkflowError(QueueError, ValueError):
    """The workflow file is not an API-format ComfyUI workflow."""


class RowsError(QueueError, ValueError):
    """The rows file as a whole cannot be read (single bad rows are reported and skipped instead)."""


class OverrideError(QueueError, ValueError):
    """A row's overrides do not fit the workflow; ``errors`` lists every problem of the row."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class ServerUnavailable(QueueError):
    """A request failed at the connection level (refused, reset, timed out, 502-504): try elsewhere."""


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


class ResponseTooLarge(RowFailed):
    """An answer or output file is larger than the limit; another server would send as much."""
