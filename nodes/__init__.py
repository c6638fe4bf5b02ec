"""The node classes of the pack: generation, understanding and ladder controls, merged."""
from __future__ import annotations

from . import ladder_nodes, model_nodes, understand_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (model_nodes, understand_nodes, ladder_nodes):
    _clash = set(NODE_CLASS_MAPPINGS) & set(_module.NODE_CLASS_MAPPINGS)
    if _clash:
        raise RuntimeError(f"Node names defined twice in the pack: {sorted(_clash)} ({_module.__name__}).")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
