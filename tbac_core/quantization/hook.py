"""The loader's one entry into quantisation: which files to read, and a component's state ready to load."""
from __future__ import annotations

import os

import torch

from ..loading.checkpoint import CheckpointFiles
from .gguf_checkpoint import GGUFCheckpointFiles, is_gguf_checkpoint
from .swap import quantize_state, swap_linears


def open_checkpoint_files(checkpoint_dir: str | os.PathLike):
    """``GGUFCheckpointFiles`` for a folder with ``model.gguf``, else the safetensors ``CheckpointFiles``."""
    if is_gguf_checkpoint(checkpoint_dir):
        return GGUFCheckpointFiles.open(checkpoint_dir)
    return CheckpointFiles.open(checkpoint_dir)


def load_component_state(files, component: str, module: torch.nn.Module, dtype, device,
                         quantization: str | None = None, rename=None,
                         input_major: frozenset[str] = frozenset()) -> dict:
    """Read one component for the meta-device ``module``; its linears become quantised where the file
    (or ``quantization``, applied while loading) says so. The result goes to ``load_strict``.

    ``input_major``: weights to store input-major (``CheckpointFiles.load_component``; safetensors
    files without quantisation only: quantised linears keep their own layout).
    """
    if quantization and isinstance(files, CheckpointFiles):
        # Each tensor is quantised as soon as it is read (the component is never whole at full
        # precision), from a copy rather than a map view whose pages would stay resident.
        state = files.load_component(component, dtype, device, zero_copy=False, transform=lambda key, tensor:
                                     quantize_state(component, {key: tensor}, quantization))
    elif input_major and isinstance(files, CheckpointFiles):
        state = files.load_component(component, dtype, device, input_major=input_major)
    else:
        state = files.load_component(component, dtype, device)
        if quantization:  # a GGUF or fp8 folder read with quantization= as well
            state = quantize_state(component, state, quantization)
    swap_linears(module, state, files.describe(), rename=rename)
    return state
