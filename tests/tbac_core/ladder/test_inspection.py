"""tbac_core.ladder.inspection on the tiny fixture: norms, similarities, summary and figure.

Tiny model: 7 rungs (0 embeddings .. 6 final norm), 4 DiT blocks, 8 metaqueries, hidden 64; the
default mapping feeds blocks 0-3 with rungs 2-5 (encodes in conftest.py).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tbac_core.errors import IncompatibleConditioningError
from tbac_core.ladder.edit import mix, weight_blocks
from tbac_core.ladder.inspection import (
    block_similarity,
    inspect,
    rung_norms,
    rung_similarity,
)


# -- inspect -----------------------------------------------------------------------------------
def test_rung_norms_and_self_similarity(a_all, embed):
    norms = rung_norms(a_all.sources[0])
    assert norms.shape == (7, 1, 8)
    torch.testing.assert_close(norms, a_all.sources[0].positive.norm(dim=-1))
    torch.testing.assert_close(rung_similarity(a_all, a_all), torch.ones(7, 1))
    torch.testing.assert_close(block_similarity(a_all, a_all, embed), torch.ones(4, 1))


def test_block_similarity_follows_the_mix(a_all, b_all, embed):
    mixed = mix(a_all, b_all, "0-1:a, 2-3:b")
    to_b = block_similarity(mixed, b_all, embed)
    torch.testing.assert_close(to_b[2:], torch.ones(2, 1))
    torch.testing.assert_close(to_b[:2], block_similarity(a_all, b_all, embed)[:2])
    assert (to_b[:2] < 0.999).all()
    # Without a model the recipe is evaluated on the metaquery states themselves.
    torch.testing.assert_close(block_similarity(a_all, b_all)[:, 0], rung_similarity(a_all, b_all)[2:6, 0])


def test_inspect_draws_and_summarises(a_all, b_all, a_default, embed):
    image, summary = inspect(a_default)
    assert image.mode == "RGB" and image.width >= 800
    assert torch.from_numpy(np.asarray(image, dtype=np.float32)).std() > 10  # something is drawn
    assert "Mapping: blocks 0-3 <- rungs 2-5" in summary and "rungs kept 0..5" in summary
    assert "Block recipes" not in summary and "similarity" not in summary

    mixed = weight_blocks(mix(a_all, b_all, "fade"), "3:0.5")
    compared, text = inspect(mixed, b_all, embed)
    assert compared.height > image.height  # one row per source plus the similarity row
    assert "block 1: 0.6667 x s0[3] + 0.3333 x s1[3]" in text and "block 3: 0.5 x s1[5]" in text
    assert "per DiT block 0..3 (in the DiT's caption space" in text
    values = [float(v) for v in text.split("per DiT block 0..3")[1].split(": ", 1)[1].split()]
    assert values == pytest.approx(block_similarity(mixed, b_all, embed)[:, 0].tolist(), abs=1e-3)
    _, without_model = inspect(mixed, b_all)
    assert "on the metaquery states (no model given)" in without_model


def test_inspect_refuses_what_it_cannot_compare(pipe, a_all, b_all):
    with pytest.raises(IncompatibleConditioningError, match="another"):
        inspect(a_all, replace(b_all, model=replace(b_all.model, name="another", fingerprint="0" * 64)))
    with pytest.raises(IncompatibleConditioningError, match="Cannot compare 2 prompts with 3"):
        inspect(pipe.encode(["x", "y"]), pipe.encode(["x", "y", "z"]))
