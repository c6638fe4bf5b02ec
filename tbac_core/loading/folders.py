"""Finding checkpoint folders by name inside model roots, without letting a name escape them.

Workflows downloaded from the internet carry checkpoint names. A name is only ever looked up
among the folders we listed ourselves under the configured roots; it is never joined onto a
path, so ``..``, absolute paths or crafted names cannot reach anything else. Symlinks that the
user placed in a model root are followed when listing (a common way to keep models elsewhere).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ..io.jsonfile import read_json
from .checkpoint import CONFIG_NAME, MODEL_TYPE

MAX_DEPTH = 3  # how deep under a root checkpoint folders are looked for


def is_checkpoint_dir(folder: Path) -> bool:
    """A folder whose config.json declares a TBAC-UniImage model."""
    config = folder / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = read_json(config, "checkpoint config", error=CheckpointError)
    except CheckpointError:  # unreadable, huge or deeply nested: not a checkpoint we can list
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def list_checkpoints(roots: list[str | os.PathLike]) -> dict[str, Path]:
    """Map display names (relative to their root, with '/') to checkpoint folders."""
    found: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            folder = Path(dirpath)
            depth = len(folder.relative_to(root).parts)
            if is_checkpoint_dir(folder) and depth > 0:
                found.setdefault(folder.relative_to(root).as_posix(), folder)
                dirnames.clear()  # a checkpoint's component folders are not checkpoints
            elif depth >= MAX_DEPTH:
                dirnames.clear()
            dirnames.sort()
    return dict(sorted(found.items()))


def resolve_checkpoint(name: str, roots: list[str | os.PathLike]) -> Path:
    """The checkpoint folder listed under ``name``; anything else is refused with the choices."""
    available = list_checkpoints(roots)
    if name in available:
        return available[name]
    choices = ", ".join(available) or "(none found)"
    raise CheckpointError(
        f"Checkpoint {name!r} is not among the TBAC-UniImage checkpoints in {', '.join(map(str, roots))}. "
        f"Available: {choices}. Place the checkpoint folder (config.json + model.safetensors) in one of "
        f"those folders."
    )
