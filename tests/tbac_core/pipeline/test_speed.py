"""Speed-ups of the denoising loop: the exact ones change no bit, the opt-in ones skip real work.

Exact: each block's cross-attention keys/values are computed once per generation. Opt-in, off by
default: First-Block-Cache (``cache_threshold``) and guidance truncation (``guidance_cutoff``).
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core.errors import InvalidParameterError
from tbac_core.modeling.dit import mask_to_bias
from tbac_core.params import SamplingParams
from tbac_core.pipeline.sampling import (
    combine_guidance,
    denoise,
    guidance_branches,
    guided_step_count,
    initial_noise,
    make_schedule,
)

STEPS = 6


@pytest.fixture(scope="module")
def conds(pipe):
    return {
        "t2i": pipe.encode(["a red cat", "a blue house"], negative_prompt="blurry"),
        "edit": pipe.encode("make it blue", images=[Image.new("RGB", (64, 48), (80, 120, 200))]),
    }


def _run(pipe, cond, params, seed=4):
    noise = initial_noise(seed, (cond.batch_size * params.num_images_per_prompt, 8, 8, 8))
    scheduler, timesteps = make_schedule(params, pipe.model.scheduler_config, pipe.model.dit.device)
    return denoise(pipe.model.dit, cond, noise, scheduler, timesteps, params)


def _keep_mask(cond, rows_tokens, repeats, branches):
    """The conditioning's keep-mask over every guidance row (all ones when it has none)."""
    if cond.attention_mask is None:
        return torch.ones(*rows_tokens, dtype=torch.long)
    return cond.attention_mask.repeat_interleave(repeats, dim=0).repeat(branches, 1)


def _reference_denoise(pipe, cond, params, seed=4):
    """The loop as it was before the speed work: keys/values of the conditions at every step."""
    dit = pipe.model.dit
    branches = guidance_branches(cond, params.image_guidance_scale)
    per_branch = [cond.block_conditions(name, dit.embed_condition) for name in branches]
    repeats = params.num_images_per_prompt
    block_conditions = [torch.cat([c[i].repeat_interleave(repeats, dim=0) for c in per_branch]) for i in range(dit.num_blocks)]
    mask_bias = mask_to_bias(_keep_mask(cond, block_conditions[0].shape[:2], repeats, len(branches)), dit.dtype)
    latents = initial_noise(seed, (cond.batch_size * repeats, 8, 8, 8))
    scheduler, timesteps = make_schedule(params, pipe.model.scheduler_config, dit.device)
    with torch.no_grad():
        for t in timesteps:
            model_input = torch.cat([latents] * len(branches))
            prediction = dit(model_input, t.expand(model_input.shape[0]), block_conditions, mask_bias)
            latents = scheduler.step(combine_guidance(prediction, branches, params), t, latents).prev_sample
    return latents


class _Counter:
    """Counts calls (and their batch rows) of a module through a forward pre-hook."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda _module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_exact_path_bit_identical_to_per_step_keys_values(pipe, conds, case):
    params = SamplingParams(steps=STEPS, num_images_per_prompt=2)
    torch.testing.assert_close(_run(pipe, conds[case], params), _reference_denoise(pipe, conds[case], params),
                               atol=0, rtol=0)


@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_accelerations_at_off_values_change_nothing(pipe, conds, case):
    default = _run(pipe, conds[case], SamplingParams(steps=STEPS))
    off = _run(pipe, conds[case], SamplingParams(steps=STEPS, cache_threshold=0.0, guidance_cutoff=1.0))
    assert torch.equal(default, off)


def test_dit_forward_takes_precomputed_keys_values(pipe, conds):
    dit = pipe.model.dit
    cond = conds["t2i"]
    block_conditions = [torch.cat([a, b]) for a, b in zip(cond.block_conditions("negative", dit.embed_condition),
                                                          cond.block_conditions("positive", dit.embed_condition))]
    mask_bias = mask_to_bias(_keep_mask(cond, block_conditions[0].shape[:2], 1, 2), dit.dtype)
    latents = initial_noise(1, (block_conditions[0].shape[0], 8, 8, 8))
    timestep = torch.full((latents.shape[0],), 500.0)
    with torch.no_grad():
        plain = dit(latents, timestep, block_conditions, mask_bias)
        precomputed = dit(latents, timestep, dit.precompute_conditions(block_conditions, mask_bias))
    assert torch.equal(plain, precomputed)


def test_step_cache_skips_blocks(pipe, conds):
    blocks = pipe.model.dit.transformer.transformer_blocks
    params = SamplingParams(steps=STEPS, cache_threshold=1.0)
    with _Counter(blocks[0]) as first, _Counter(blocks[-1]) as last:
        cached = _run(pipe, conds["t2i"], params)
    assert len(first.rows) == STEPS  # block 0 is the probe: it runs at every step
    assert 1 <= len(last.rows) < STEPS  # the first step is always full, later ones reuse its residual
    assert torch.isfinite(cached).all()
    exact = _run(pipe, conds["t2i"], SamplingParams(steps=STEPS))
    assert not torch.equal(cached, exact)


def test_step_cache_tiny_threshold_runs_every_block(pipe, conds):
    last_block = pipe.model.dit.transformer.transformer_blocks[-1]
    with _Counter(last_block) as last:
        cached = _run(pipe, conds["t2i"], SamplingParams(steps=STEPS, cache_threshold=1e-12))
    assert len(last.rows) == STEPS
    torch.testing.assert_close(cached, _run(pipe, conds["t2i"], SamplingParams(steps=STEPS)), atol=0, rtol=0)


@pytest.mark.parametrize("case,branches", [("t2i", 2), ("edit", 3)])
def test_guidance_cutoff_drops_negative_branches(pipe, conds, case, branches):
    params = SamplingParams(steps=STEPS, guidance_cutoff=0.5)
    images = conds[case].batch_size
    with _Counter(pipe.model.dit) as dit_calls:
        truncated = _run(pipe, conds[case], params)
    guided = guided_step_count(STEPS, 0.5)
    assert dit_calls.rows == [branches * images] * guided + [images] * (STEPS - guided)
    assert torch.isfinite(truncated).all()
    assert not torch.equal(truncated, _run(pipe, conds[case], SamplingParams(steps=STEPS)))


def test_guidance_cutoff_zero_is_the_positive_branch_alone(pipe, conds):
    """With no guided step the result is plain conditional sampling (guidance scale 1)."""
    truncated = _run(pipe, conds["t2i"], SamplingParams(steps=STEPS, guidance_cutoff=0.0))
    unguided = _run(pipe, conds["t2i"], SamplingParams(steps=STEPS, guidance_scale=1.0))
    torch.testing.assert_close(truncated, unguided, atol=1e-5, rtol=0)


def test_step_cache_survives_guidance_cutoff(pipe, conds):
    """After the cutoff the cache keeps the positive rows' residuals instead of starting over."""
    last_block = pipe.model.dit.transformer.transformer_blocks[-1]
    params = SamplingParams(steps=STEPS, cache_threshold=1.0, guidance_cutoff=0.5)
    with _Counter(last_block) as last:
        result = _run(pipe, conds["t2i"], params)
    assert last.rows == [2 * conds["t2i"].batch_size]  # only the first step ran the remaining blocks
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("field,value", [("cache_threshold", -0.1), ("cache_threshold", 2.0),
                                         ("cache_threshold", float("nan")), ("guidance_cutoff", 1.5),
                                         ("guidance_cutoff", -0.5), ("guidance_cutoff", "half")])
def test_acceleration_fields_validated(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        SamplingParams(**{field: value}).validate()
