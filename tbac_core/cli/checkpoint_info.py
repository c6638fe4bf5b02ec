"""What a checkpoint's ``config.json`` alone says: enough to check a job before any weight is read.

Reading it takes milliseconds (plain JSON, no torch), so typos and impossible sizes are reported
before the model loads, and a batch whose outputs all exist is skipped without loading it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UsageError
from ..io import parse_json, read_text_bounded
from ..loading import TBACConfig
from .options import CONFIG_NAME

# The config.json key of the sampling settings a model was tuned with (the demo model stores its own).
CHECKPOINT_DEFAULTS_KEY = "demo_defaults"
# Sizes are left out: the model's trained size is already the default, and image-to-image keeps the
# start image's size.
_DEFAULTS_TO_FIELDS = {"steps": "steps", "guidance_scale": "guidance", "sampler": "sampler", "layers": "layers"}


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    latent_factor: int  # config.json vae_downsample_f: sizes are multiples of it
    default_size: int  # the trained size in pixels (input_size * vae_downsample_f)
    config_sha256: str  # identifies the checkpoint's config in output records (renames do not matter)
    job_defaults: dict[str, Any] = field(default_factory=dict)  # stored sampling settings, as job fields

    @property
    def name(self) -> str:
        return self.folder.name

    @classmethod
    def read(cls, folder: str | Path) -> "CheckpointInfo":
        folder = Path(folder)
        path = folder / CONFIG_NAME
        text = read_text_bounded(path, "checkpoint config", error=CheckpointError)
        raw = parse_json(text, str(path), error=CheckpointError)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}.")
        config = TBACConfig.from_dict(raw, str(path))
        if config.vae_downsample_f < 1 or config.input_size < 1:
            raise CheckpointError(f"{path}: vae_downsample_f and input_size must be positive, got "
                                  f"{config.vae_downsample_f} and {config.input_size}.")
        return cls(folder, config.vae_downsample_f, config.default_image_size,
                   hashlib.sha256(text.encode("utf-8")).hexdigest(), _stored_job_defaults(raw))


def _stored_job_defaults(raw: dict) -> dict[str, Any]:
    stored = raw.get(CHECKPOINT_DEFAULTS_KEY) or {}
    if not isinstance(stored, dict):
        raise UsageError(f"config.json: {CHECKPOINT_DEFAULTS_KEY} must be an object, got {stored!r}.")
    return {name: stored[key] for key, name in _DEFAULTS_TO_FIELDS.items() if key in stored}


def checkpoint_job_defaults(pipe) -> dict[str, Any]:
    """Job defaults stored in a loaded pipeline's checkpoint config (flags and rows override them)."""
    return CheckpointInfo.read(pipe.model.checkpoint_dir).job_defaults
