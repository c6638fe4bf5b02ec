"""``comfy_api.v0_0_2``: ``io``, ``ui`` and ``ComfyExtension`` (test double, see ``comfy_api``)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from . import io, ui


class ComfyExtension(ABC):
    """What a pack's ``comfy_entrypoint()`` returns; ComfyUI awaits ``on_load`` then ``get_node_list``."""

    async def on_load(self) -> None:
        """Called once when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes of the extension."""


__all__ = ["ComfyExtension", "io", "ui"]
