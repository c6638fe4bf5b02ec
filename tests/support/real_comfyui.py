"""Start a real ComfyUI's Python in this process, then import the pack as ComfyUI loads a custom node.

For the scripts that a test runs in ComfyUI's own environment (``native_parity.py``,
``comfy_workflows.py``): ComfyUI is imported as its server does with ``--cpu``; this folder holds the
tests' ``comfy_api`` double, so it is taken off ``sys.path`` first and the real ``comfy_api`` wins.
"""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def import_comfyui(comfy_dir: Path) -> None:
    """Make ``comfy``, ``nodes``, ``folder_paths`` importable and parse ComfyUI's arguments (``--cpu``)."""
    sys.path[:] = [str(comfy_dir)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args
    import comfy.model_management
    import folder_paths  # noqa: F401


def import_pack(pack_root: Path, name: str = "tbac_native_check"):
    """The pack's ``__init__.py`` as package ``name``; it must see the real ComfyUI."""
    spec = importlib.util.spec_from_file_location(name, pack_root / "__init__.py",
                                                  submodule_search_locations=[str(pack_root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    assert pack.nodes.comfy_bridge.IN_COMFYUI, "the pack did not see the real ComfyUI"
    return pack


def pack_node_classes(pack) -> dict:
    """``{node_id: class}`` from the pack's entry point, as ComfyUI registers V3 nodes."""
    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}
