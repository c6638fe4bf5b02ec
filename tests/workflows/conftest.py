"""Installs the ``comfy_api`` test double and imports the pack as ComfyUI does (see ``tests/support/pack.py``)."""
from __future__ import annotations

import pack
import pytest


@pytest.fixture(scope="session")
def pipe(checkpoint_dir):
    """The tiny model run by the pack's own copy of the library (its classes are the ones the nodes see)."""
    return pack.PACK.tbac_core.TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32")
