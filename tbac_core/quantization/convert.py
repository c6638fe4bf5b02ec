"""``quantize_checkpoint``: an official checkpoint folder -> an fp8 or GGUF checkpoint folder.

fp8 writes the official layout (``config.json`` + ``model.safetensors``) with ``float8_e4m3fn``
linear weights and their ``scale_weight`` next to them; Q8_0 / Q5_K / Q4_K write ``config.json`` +
``model.gguf``. Everything else in the source folder (component configs, tokenizer files) is copied,
so the new folder loads on its own with ``load_model``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..loading.checkpoint import (
    COMPONENT_PREFIXES,
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE_NAME,
    CheckpointFiles,
    read_checkpoint_config,
)
from .gguf_checkpoint import GGUF_NAME, write_gguf
from .swap import FORMATS, quantize_state

_WEIGHT_FILES = (SINGLE_FILE_NAME, INDEX_NAME, GGUF_NAME)


def quantize_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, format: str = "fp8") -> Path:
    """Write ``src_dir`` quantised to ``format`` (one of ``FORMATS``) into ``out_dir``; returns it."""
    if format not in FORMATS:
        raise CheckpointError(f"Unknown quantization format {format!r}; choose one of {', '.join(FORMATS)}.")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    read_checkpoint_config(src_dir)
    files = CheckpointFiles.open(src_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise CheckpointError(f"The output folder {out_dir} is the source checkpoint; choose another.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"The output folder {out_dir} is not empty; choose a new or empty folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_small_files(src_dir, out_dir)

    tensors = {}
    for component, prefix in COMPONENT_PREFIXES.items():
        state = quantize_state(component, files.load_component(component, dtype=None), format)
        tensors.update({prefix + key: value for key, value in state.items()})
    if format == "fp8":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / SINGLE_FILE_NAME),
                  metadata={"format": "pt", "tbac.quantization": "fp8"})
    else:
        write_gguf(out_dir / GGUF_NAME, tensors, format)
    return out_dir


def _copy_small_files(src_dir: Path, out_dir: Path) -> None:
    for entry in src_dir.iterdir():
        if entry.name in _WEIGHT_FILES or (entry.name.startswith("model-") and entry.suffix == ".safetensors"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name)
        else:
            shutil.copy2(entry, out_dir / entry.name)
    if not (out_dir / CONFIG_NAME).is_file():
        raise CheckpointError(f"{src_dir} has no {CONFIG_NAME} to copy.")
