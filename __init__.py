"""ComfyUI entry point of the TBAC-UniImage node pack (V3 node schema).

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``; the nodes live in
``nodes/`` and import the library as this package's own ``tbac_core`` subpackage (relative
imports), so no other installed ``tbac_core`` can take its place. There is deliberately no
``NODE_CLASS_MAPPINGS`` here: ComfyUI reads those first and would then skip the entry point.
"""
from __future__ import annotations

if __package__:  # pytest imports this file as a plain module when the clone's folder is not a package name
    from .nodes import TBACExtension


async def comfy_entrypoint() -> TBACExtension:
    return TBACExtension()
