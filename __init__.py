"""ComfyUI entry point of the TBAC-UniImage node pack (classic node API).

ComfyUI imports this file as a package; the nodes live in ``nodes/`` and call the standalone
library ``tbac_core``, which is imported by its own name (it is also used without ComfyUI), so
the pack folder is appended to ``sys.path`` (appended, not prepended: it must not shadow
ComfyUI's own top-level modules such as ``nodes``).
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
