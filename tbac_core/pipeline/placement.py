"""Where each part of the model lives while it is not running: the library's memory modes.

* ``full``: MLLM, DiT and VAE stay on the compute device (fastest, most memory).
* ``offload-mllm``: the MLLM comes to the device for encoding and goes back to the CPU, so
  sampling needs only the DiT and the VAE (TBAC-UniImage-3B: ~3.3 GB instead of ~11.4 GB in bf16).
* ``sequential``: each part is on the device only while it runs (least memory, slowest).
* ``external``: nothing is moved; the caller puts each part where it must run before using it.

Inside ComfyUI the nodes hand the parts to ComfyUI's own memory manager instead (mode ``external``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import InvalidParameterError

MEMORY_MODES = ("full", "offload-mllm", "sequential", "external")
PARTS = ("mllm", "dit", "vae")


class Placement:
    """Moves the parts of a ``TBACModel`` between the compute and the offload device."""

    def __init__(self, model, device: torch.device | str, mode: str = "full",
                 offload_device: torch.device | str = "cpu"):
        if mode not in MEMORY_MODES:
            raise InvalidParameterError(f"Unknown memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}.")
        self.model = model
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.mode = mode
        if mode == "external":
            return
        for part in PARTS:
            self._module(part).to(self._home(part))

    def _module(self, part: str) -> torch.nn.Module:
        return getattr(self.model, part)

    def _home(self, part: str) -> torch.device:
        """Where a part rests between uses."""
        if self.mode == "full" or (self.mode == "offload-mllm" and part != "mllm"):
            return self.device
        return self.offload_device

    @contextmanager
    def use(self, part: str):
        """Bring ``part`` to the compute device for the duration of the block."""
        module = self._module(part)
        if self.mode == "external":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            home = self._home(part)
            if home != self.device:
                module.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
