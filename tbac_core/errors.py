"""Exceptions raised by tbac_core.

Every error says what was wrong, what is allowed and where we looked, so a user of the
ComfyUI nodes or the CLI can fix the problem without reading a traceback.
"""
from __future__ import annotations


class TBACError(Exception):
    """Base class of every error tbac_core raises on purpose."""


class CheckpointError(TBACError):
    """A checkpoint folder or file is missing, incomplete, corrupt or of the wrong kind."""


class ComponentNotFoundError(TBACError):
    """A tokenizer, processor or component config could not be found locally."""


class IncompatibleConditioningError(TBACError):
    """A LadderConditioning was made by another model or does not fit the DiT it is given to."""


class InvalidParameterError(TBACError, ValueError):
    """A generation parameter (size, steps, guidance, batch, seed, ...) is out of range."""


class NonFiniteOutputError(TBACError):
    """Sampling produced NaN/inf values; saving the image would give a black or garbage picture."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint's or an adapter's weights hold NaN or inf values; the message names the tensors."""


class AdapterError(CheckpointError):
    """An adapter folder is unreadable, incomplete, or made for another base model."""


class ConditioningFileError(TBACError, ValueError):
    """A saved conditioning file is missing, malformed, corrupt or of another format."""


class LayerSpecError(TBACError, ValueError):
    """A layer spec or block-weight spec is malformed or does not fit the model.

    The message always says what was wrong, what is allowed (the valid range or the syntax)
    and echoes the offending spec, because ComfyUI shows it to the user verbatim.
    """


class PNGMetadataError(TBACError):
    """A PNG has no (or unreadable) TBAC generation parameters."""


class UsageError(TBACError):
    """Arguments, files or rows that cannot be used; reported without a traceback (exit 2)."""


class OutputExistsError(UsageError, FileExistsError):
    """A no-overwrite writer found its file already there (still a ``FileExistsError`` for callers that count on)."""

    def __init__(self, path):
        super().__init__(f"{path} already exists; choose another name or allow overwriting.")


class TrainingDivergedError(TBACError):
    """The loss or the gradient norm became NaN or infinite."""


class JobError(UsageError):
    """A command-line job or batch row has unusable values; ``problems`` lists ``(field, message)``."""

    def __init__(self, where: str, problems: list[tuple[str, str]]):
        self.where = where
        self.problems = problems
        super().__init__("\n".join(f"{where}: {name}: {message}" for name, message in problems))
