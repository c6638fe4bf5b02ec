"""Files the library writes and reads besides checkpoints: safe writes, PNG parameter chunks."""
from .._exports import lazy_exports

_EXPORTS = {"atomic_write": ".files", "encode_png": ".pngmeta", "read_parameters": ".pngmeta"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
