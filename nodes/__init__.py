"""The pack's nodes (V3 schema) and the ComfyUI extension that lists them."""
from __future__ import annotations

from . import generate, ladder, loader, native, understand
from .comfy_bridge import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = [loader.TBACModelLoader, *generate.NODES, *understand.NODES, *ladder.NODES,
                                   *native.NODES]


class TBACExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["NODES", "TBACExtension"]
