"""Where each part of the model lives while it is not running.

The pipeline runs a part only inside ``placement.use(part)``, which yields the module ready on its
compute device. Any object with that method is a placement (the ``Placement`` protocol):

* ``MemoryModePlacement`` is the library's own, with three modes:
  ``full`` (MLLM, DiT and VAE stay on the compute device: fastest, most memory),
  ``offload-mllm`` (the MLLM comes to the device for encoding and goes back to the CPU, so sampling
  needs only the DiT and the VAE: TBAC-UniImage-3B ~3.3 GB instead of ~11.4 GB in bf16) and
  ``sequential`` (each part is on the device only while it runs: least memory, slowest).
* Inside ComfyUI, ``nodes.comfy_bridge`` supplies one backed by ComfyUI's ``ModelPatcher``s, so
  ComfyUI's memory manager decides what stays loaded.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from ..errors import InvalidParameterError
from ..params import MEMORY_MODES

PARTS = ("mllm", "dit", "vae")


class Placement(Protocol):
    def use(self, part: str) -> AbstractContextManager[torch.nn.Module]:
        """Bring ``part`` (one of ``PARTS``) to its compute device for the duration of the block."""


class MemoryModePlacement:
    """Moves the parts of a ``TBACModel`` between the compute and the offload device."""

    def __init__(self, model, device: torch.device | str, mode: str = "full",
                 offload_device: torch.device | str = "cpu"):
        if mode not in MEMORY_MODES:
            raise InvalidParameterError(f"Unknown memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}.")
        self.model = model
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.mode = mode
        for part in PARTS:
            self._module(part).to(self._home(part))

    def _module(self, part: str) -> torch.nn.Module:
        if part not in PARTS:
            raise InvalidParameterError(f"Unknown model part {part!r}; parts are {', '.join(PARTS)}.")
        return getattr(self.model, part)

    def _home(self, part: str) -> torch.device:
        """Where a part rests between uses."""
        if self.mode == "full" or (self.mode == "offload-mllm" and part != "mllm"):
            return self.device
        return self.offload_device

    @contextmanager
    def use(self, part: str):
        module = self._module(part)
        module.to(self.device)
        try:
            yield module
        finally:
            home = self._home(part)
            if home != self.device:
                module.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
