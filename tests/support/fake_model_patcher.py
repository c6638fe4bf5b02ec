"""ComfyUI's memory manager reduced to its partial-loading contract, for tests without a ComfyUI checkout.

What ``comfy.model_patcher.ModelPatcher.load(lowvram_model_memory=...)`` (v0.24) does with a model,
kept to what the pack relies on: the modules it manages are those holding parameters of their own
and no child holding any, plus any module marked ``comfy_cast_weights``; it takes them largest
first, moves each to the load device while the loaded bytes plus a reserve for streaming the
largest offloaded module stay under the budget, leaves each marked module that does not fit where
it is with ``comfy_cast_weights = True``, leaves an unmarked one that does not fit where it is
unmarked, and finally runs the ON_LOAD callbacks. ``FakeMemoryManager.load_models_gpu`` hands each
patcher ``fraction`` of its size as the budget (None: a full load), as the real one hands over what
it computed from the free memory. The real code is exercised by ``partial_load_check.py``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

ON_LOAD = "on_load_after"  # comfy.patcher_extension.CallbacksMP.ON_LOAD


def _own_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module._parameters.values(), *module._buffers.values()] if t is not None)


class FakeModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.callbacks: dict[str, list] = {}
        self.loaded_bytes = 0

    def add_callback(self, call_type: str, callback) -> None:
        self.callbacks.setdefault(call_type, []).append(callback)

    def model_size(self) -> int:
        return sum(t.nbytes for t in self.model.state_dict().values())

    def managed_modules(self) -> list[torch.nn.Module]:
        def is_leaf_with_params(m):
            return bool(m._parameters) and not any(p is not None for c in m.children() for p in c.parameters())
        return [m for m in self.model.modules() if hasattr(m, "comfy_cast_weights") or is_leaf_with_params(m)]

    def load(self, device_to, lowvram_model_memory: float | None) -> None:
        managed = sorted(self.managed_modules(), key=_own_bytes, reverse=True)
        reserve, used = 0, 0
        for module in managed:
            size = _own_bytes(module)
            if lowvram_model_memory is None or used + size + reserve < lowvram_model_memory:
                module.to(device_to)
                module.comfy_patched_weights = True
                used += size
                if hasattr(module, "comfy_cast_weights"):
                    module.comfy_cast_weights = False
            else:
                reserve = max(reserve, size)
                if hasattr(module, "comfy_cast_weights"):
                    module.comfy_cast_weights = True
        if lowvram_model_memory is None:
            self.model.to(device_to)
        self.loaded_bytes = used
        for callback in self.callbacks.get(ON_LOAD, []):
            callback(self, device_to, lowvram_model_memory or 0, False, lowvram_model_memory is None)


class FakeMemoryManager:
    def __init__(self):
        self.fraction: float | None = None
        self.calls: list[dict] = []

    def load_models_gpu(self, models, **kwargs):
        self.calls.append(kwargs)
        for patcher in models:
            budget = None if self.fraction is None else max(0.1, self.fraction * patcher.model_size())
            patcher.load(patcher.load_device, budget)


def fake_comfy(manager: FakeMemoryManager) -> SimpleNamespace:
    """The ``comfy`` names the bridge's placement code reaches."""
    return SimpleNamespace(model_patcher=SimpleNamespace(ModelPatcher=FakeModelPatcher),
                           patcher_extension=SimpleNamespace(CallbacksMP=SimpleNamespace(ON_LOAD=ON_LOAD)),
                           model_management=manager)
