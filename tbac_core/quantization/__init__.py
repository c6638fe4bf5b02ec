"""Quantised weights: fp8 (``float8_e4m3fn``) and GGUF (Q8_0 / Q5_K / Q4_K) linears, files and conversion.

``load_model(..., quantization="fp8")`` quantises a 16/32-bit checkpoint while loading; a folder
written by ``quantize_checkpoint`` (or ``python -m tbac_core quantize``) is recognised and loaded as
it is. Only the linear weights of the MLLM's decoder layers and the DiT's blocks are quantised.
"""
from .._exports import lazy_exports

_EXPORTS = {
    "FORMATS": ".swap",
    "quantize_state": ".swap",
    "swap_linears": ".swap",
    "is_quantizable": ".swap",
    "FP8Linear": ".fp8",
    "GGUFLinear": ".ggml",
    "quantize_checkpoint": ".convert",
    "GGUFCheckpointFiles": ".gguf_checkpoint",
    "is_gguf_checkpoint": ".gguf_checkpoint",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
