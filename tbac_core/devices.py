"""Choosing the compute device and dtype from the user's words (``auto``, ``cpu``, ``bf16``...), and
where what the library keeps between calls waits (``to_host``)."""
from __future__ import annotations

import torch

from .errors import InvalidParameterError


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise InvalidParameterError(f"Unknown dtype {dtype!r}; choose auto, {', '.join(sorted(names))}.")
    return names[dtype]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in CPU memory (itself when it is there already).

    What the library keeps between calls (the guidance rows' MLLM states, recent images' vision
    features) waits in CPU memory, so GPU memory holds only what a run uses: in ComfyUI that is what
    its memory manager loads and accounts for. Each use brings its few MB back to the device.
    """
    return tensor.to("cpu")
