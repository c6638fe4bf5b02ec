"""The node pack, imported the way ComfyUI imports a custom node folder, with the ``comfy_api`` double.

ComfyUI loads ``<pack>/__init__.py`` as a package under a name of its own and calls its
``comfy_entrypoint()``; so do we, under the fixed name ``PACK_NAME``. The pack then uses its own
copy of the library, ``tbac_uniimage_pack.tbac_core`` (a second set of modules next to the
top-level ``tbac_core`` the library tests use): node tests take error classes and library calls from
``PACK.tbac_core``. ``comfy_api`` resolves to the double in ``tests/support/comfy_api`` (this folder
is on ``sys.path``); importing this module checks that it does, before the pack is imported.
"""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import comfy_api.v0_0_2

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]
PACK_NAME = "tbac_uniimage_pack"

if Path(comfy_api.v0_0_2.__file__).resolve().parent.parent != SUPPORT / "comfy_api":
    raise ImportError(f"comfy_api resolves to {comfy_api.__file__}, not the test double in {SUPPORT}.")


def import_pack(name: str = PACK_NAME):
    """``<ROOT>/__init__.py`` as package ``name`` (once), as ComfyUI's ``load_custom_node`` does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def node_classes(pack) -> dict:
    """``{node_id: class}`` from the pack's entry point, as ComfyUI registers V3 nodes."""
    extension = asyncio.run(pack.comfy_entrypoint())
    asyncio.run(extension.on_load())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def run_node(cls, **inputs):
    """Run one node as ComfyUI does (``EXECUTE_NORMALIZED``): returns ``(outputs tuple, ui dict or None)``."""
    output = getattr(cls, cls.FUNCTION)(**inputs)
    return tuple(output.args), output.ui


def outputs(cls, **inputs) -> tuple:
    """The outputs of one node run."""
    return run_node(cls, **inputs)[0]


PACK = import_pack()
NODE_CLASSES = node_classes(PACK)
