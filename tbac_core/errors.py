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


class GenerationInterrupted(TBACError):
    """Raised by the default cancellation check when a run was cancelled."""


class NonFiniteOutputError(TBACError):
    """Sampling produced NaN/inf values; saving the image would give a black or garbage picture."""
