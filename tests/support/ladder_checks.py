"""Shared by the ladder tests on the tiny fixture: prompts, sampling settings, condition checks."""
from __future__ import annotations

import torch

from tbac_core.params import SamplingParams

PROMPT_A = "a red cat sitting on a blue chair"
PROMPT_B = "a small green house next to the river"
PARAMS = SamplingParams(steps=2, guidance_scale=4.5, seed=5)


def conditions(cond, embed, branch="positive"):
    with torch.no_grad():
        return cond.block_conditions(branch, embed)


def assert_same_conditions(x, y, embed):
    for branch in ("positive", "negative"):
        for block, (p, q) in enumerate(zip(conditions(x, embed, branch), conditions(y, embed, branch))):
            assert torch.equal(p, q), f"{branch} block {block} differs"


def sample(pipe, cond):
    return pipe.sample(cond, width=64, height=64, params=PARAMS)
