"""Fixtures of the command-line tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def input_png(fixture_root):
    return fixture_root / "goldens" / "edit_input_0.png"
