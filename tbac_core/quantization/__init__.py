"""Quantised weights: fp8 (``float8_e4m3fn``) and GGUF (Q8_0 / Q5_K / Q4_K) linears, files and conversion.

``load_model(..., quantization="fp8")`` quantises a 16/32-bit checkpoint while loading; a folder
written by ``quantize_checkpoint`` (or ``python -m tbac_core quantize``) is recognised and loaded as
it is. Only the linear weights of the MLLM's decoder layers and the DiT's blocks are quantised.
"""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".swap": ("FORMATS", "quantize_state", "swap_linears", "is_quantizable"),
    ".fp8": ("FP8Linear",),
    ".ggml": ("GGUFLinear",),
    ".convert": ("quantize_checkpoint",),
    ".gguf_checkpoint": ("GGUFCheckpointFiles", "is_gguf_checkpoint"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
