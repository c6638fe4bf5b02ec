"""The model: frozen Qwen2.5-VL MLLM, metaquery connector + ladder DiT (SANA), and the DC-AE."""
from .._exports import lazy_exports

_EXPORTS = {"TBACModel": ".model", "LadderDiT": ".dit", "Connector": ".dit", "mask_to_bias": ".dit"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
