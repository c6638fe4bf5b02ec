"""Encodes of the tiny fixture shared by the ladder tests (edit, inspection, io).

Tiny model: 7 rungs (0 embeddings .. 6 final norm), 4 DiT blocks, 8 metaqueries, hidden 64; the
default mapping feeds blocks 0-3 with rungs 2-5.
"""
from __future__ import annotations

import pytest
from ladder_checks import PROMPT_A, PROMPT_B
from PIL import Image


@pytest.fixture(scope="module")
def embed(pipe):
    return pipe.model.dit.embed_condition


@pytest.fixture(scope="module")
def a_all(pipe):
    return pipe.encode(PROMPT_A, keep_all_rungs=True)


@pytest.fixture(scope="module")
def b_all(pipe):
    return pipe.encode(PROMPT_B, keep_all_rungs=True)


@pytest.fixture(scope="module")
def a_default(pipe):
    return pipe.encode(PROMPT_A)


@pytest.fixture(scope="module")
def edit_cond(pipe, fixture_root):
    image = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    return pipe.encode([PROMPT_A, PROMPT_B], images=[image], negative_prompt="blurry")
