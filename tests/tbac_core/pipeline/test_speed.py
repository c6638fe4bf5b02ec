"""Speed-ups of the denoising loop: the exact ones change no bit, the opt-in ones skip real work.

Exact: each block's cross-attention keys/values are computed once per generation. Opt-in, off by
default: First-Block-Cache (``cache_threshold``) and guidance truncation (``guidance_cutoff``).
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core.errors import InvalidParameterError
from tbac_core.modeling.dit import ConditionKVCache, mask_to_bias
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


def test_condition_kv_cache_reuses_equal_conditions_per_key_and_recomputes_changed_ones(pipe, conds):
    dit = pipe.model.dit
    cond = conds["t2i"]
    negative, positive = (torch.cat(cond.block_conditions(name, dit.embed_condition), dim=1)
                          for name in ("negative", "positive"))  # [2, blocks * N, D] each
    rows = negative.shape[0]
    mask_bias = mask_to_bias(_keep_mask(cond, (rows, negative.shape[1] // dit.num_blocks), 1, 1), dit.dtype)
    latents = initial_noise(1, (2 * rows, 8, 8, 8))
    timestep = torch.full((2 * rows,), 500.0)

    def forward(conditions):
        with torch.no_grad():
            return dit(latents, timestep, conditions, torch.cat([mask_bias, mask_bias]))

    batch = torch.cat([negative, positive])  # a copy, as core's cond_cat makes at every step
    plain = forward(list(batch.chunk(dit.num_blocks, dim=1)))
    cache = ConditionKVCache()
    with torch.no_grad():
        first = cache.block_kv(dit, batch, torch.cat([mask_bias, mask_bias]), ["neg", "pos"])
        again = cache.block_kv(dit, torch.cat([negative, positive]), torch.cat([mask_bias, mask_bias]),
                               ["neg", "pos"])
    assert (cache.computed, cache.reused) == (2, 2)
    assert torch.equal(forward(first), plain) and torch.equal(forward(again), plain)
    # The groups one at a time, then in the other order: still one projection per key.
    with torch.no_grad():
        alone = cache.block_kv(dit, positive, mask_bias, ["pos"])
        swapped = cache.block_kv(dit, torch.cat([positive, negative]), torch.cat([mask_bias, mask_bias]),
                                 ["pos", "neg"])
    assert (cache.computed, cache.reused) == (2, 5)
    assert torch.equal(alone[0].key, first[0].key[rows:])
    assert torch.equal(swapped[0].key[:rows], first[0].key[rows:])
    # A key that comes back with other values is projected again, never served stale.
    with torch.no_grad():
        changed = cache.block_kv(dit, negative + 1.0, mask_bias, ["neg"])
        masked = cache.block_kv(dit, negative + 1.0, torch.full_like(mask_bias, -10000.0), ["neg"])
    assert (cache.computed, cache.reused) == (4, 5)
    assert not torch.equal(changed[0].key, first[0].key[:rows])
    assert torch.equal(masked[0].key, changed[0].key) and not torch.equal(masked[0].attention_mask,
                                                                           changed[0].attention_mask)
    # Weights changed in place (a ComfyUI hook patching them between steps): projected again.
    to_k = dit.transformer.transformer_blocks[0].attn2.to_k.weight
    with torch.no_grad():
        cache.block_kv(dit, negative + 1.0, mask_bias, ["neg"])
        assert (cache.computed, cache.reused) == (5, 5)
        assert cache.block_kv(dit, negative + 1.0, mask_bias, ["neg"])[0] is not None
        assert (cache.computed, cache.reused) == (5, 6)
        to_k.mul_(1.0)  # same values, but written: a hook's patch
        repatched = cache.block_kv(dit, negative + 1.0, mask_bias, ["neg"])
    assert (cache.computed, cache.reused) == (6, 6)
    assert torch.equal(repatched[0].key, changed[0].key)
    with pytest.raises(ValueError, match="3 equal groups"):
        cache.block_kv(dit, batch, None, ["a", "b", "c"])


def test_one_timestep_for_all_rows_is_embedded_once(pipe, conds):
    """The sampler's expanded timestep (stride 0) is embedded for one row and broadcast."""
    dit = pipe.model.dit
    cond = conds["t2i"]
    block_conditions = [torch.cat([a, b]) for a, b in zip(cond.block_conditions("negative", dit.embed_condition),
                                                          cond.block_conditions("positive", dit.embed_condition))]
    latents = initial_noise(1, (block_conditions[0].shape[0], 8, 8, 8))
    rows = latents.shape[0]
    with torch.no_grad(), _Counter(dit.transformer.time_embed.emb.timestep_embedder) as embedded:
        shared = dit(latents, torch.tensor(500.0).expand(rows), block_conditions)
        per_row = dit(latents, torch.full((rows,), 500.0), block_conditions)  # a plain tensor: every row
    assert embedded.rows == [1, rows]
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_skips,full_steps", [(1, [0, 2, 4]), (2, [0, 3]), (STEPS, [0])])
def test_step_cache_skips_blocks_at_most_max_skips_steps_in_a_row(pipe, conds, max_skips, full_steps):
    blocks = pipe.model.dit.transformer.transformer_blocks
    params = SamplingParams(steps=STEPS, cache_threshold=1.0, cache_max_skips=max_skips)
    ran_last_block = []
    with _Counter(blocks[0]) as first, _Counter(pipe.model.dit) as steps:
        handle = blocks[-1].register_forward_pre_hook(lambda _m, _a: ran_last_block.append(len(steps.rows) - 1))
        try:
            cached = _run(pipe, conds["t2i"], params)
        finally:
            handle.remove()
    assert len(first.rows) == STEPS  # block 0 is the probe: it runs at every step
    assert ran_last_block == full_steps  # the first step is always full; a full step after max_skips reused ones
    assert torch.isfinite(cached).all()
    exact = _run(pipe, conds["t2i"], SamplingParams(steps=STEPS))
    assert not torch.equal(cached, exact)


def test_step_cache_extrapolates_the_residual_in_the_timestep():
    """A reused step's residual follows the line through the last two full steps' residuals."""
    from tbac_core.modeling.step_cache import FirstBlockCache

    cache = FirstBlockCache(threshold=0.5, max_skips=2)
    probe = torch.ones(2, 3, 4)
    hidden = torch.full((2, 3, 4), 10.0)
    cache.store(probe, torch.full((2, 3, 4), 1.0), torch.tensor(900.0).expand(2))
    assert torch.equal(cache.apply(hidden, torch.tensor(800.0).expand(2)), hidden + 1.0)  # one full step: as is
    cache.store(probe, torch.full((2, 3, 4), 3.0), torch.tensor(700.0).expand(2))
    assert cache.can_reuse(probe * 1.1)  # changed by 10 % < 50 %
    # slope (3 - 1) / (700 - 900) per unit of timestep; at 600: 3 + 1 = 4
    torch.testing.assert_close(cache.apply(hidden, torch.tensor(600.0).expand(2)), hidden + 4.0)
    assert cache.can_reuse(probe)
    assert not cache.can_reuse(probe)  # max_skips reached: the next step must run in full
    assert not cache.can_reuse(probe * 2)  # (and a large change alone also refuses)
    cache.keep_rows(slice(1, 2))  # guidance truncation keeps the positive row of every reference
    assert [residual.shape[0] for _t, residual in cache.full_history] == [1, 1]
    assert cache.first_residual.shape[0] == 1
    degenerate = FirstBlockCache(threshold=0.5, max_skips=2)
    for value in (1.0, 3.0):
        degenerate.store(probe, torch.full((2, 3, 4), value), torch.tensor(700.0).expand(2))
    assert torch.equal(degenerate.apply(hidden, torch.tensor(600.0).expand(2)), hidden + 3.0)  # no slope, no inf


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
    batch = conds["t2i"].batch_size
    for max_skips, expected in ((STEPS, [2 * batch]), (2, [2 * batch, batch])):
        params = SamplingParams(steps=STEPS, cache_threshold=1.0, guidance_cutoff=0.5, cache_max_skips=max_skips)
        with _Counter(last_block) as last:
            result = _run(pipe, conds["t2i"], params)
        # STEPS: only the first step ran the later blocks; 2: steps 0 (all branches) and 3 (positive rows)
        assert last.rows == expected
        assert torch.isfinite(result).all()


@pytest.mark.parametrize("field,value", [("cache_threshold", -0.1), ("cache_threshold", 2.0),
                                         ("cache_threshold", float("nan")), ("guidance_cutoff", 1.5),
                                         ("guidance_cutoff", -0.5), ("guidance_cutoff", "half"),
                                         ("cache_max_skips", 0), ("cache_max_skips", 11), ("cache_max_skips", 2.5),
                                         ("cache_max_skips", True)])
def test_acceleration_fields_validated(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        SamplingParams(**{field: value}).validate()


# -- the token-major Mix-FFN (exact) ----------------------------------------------------------------
def test_dit_blocks_run_the_token_major_ffn_and_it_equals_glumbconv(pipe):
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    from tbac_core.modeling.mix_ffn import TokenMajorGLUMBConv

    blocks = pipe.model.dit.transformer.transformer_blocks
    assert all(isinstance(block.ff, TokenMajorGLUMBConv) for block in blocks)
    ff = blocks[0].ff
    reference = GLUMBConv(ff.conv_inverted.in_channels, ff.conv_point.out_channels,
                          expand_ratio=ff.conv_point.in_channels / ff.conv_inverted.in_channels,
                          norm_type=None, residual_connection=False)
    reference.load_state_dict(ff.state_dict())  # same module names: the checkpoint keys are unchanged
    tokens = torch.randn(2, 4, 6, ff.conv_inverted.in_channels, generator=torch.Generator().manual_seed(0))
    spatial = tokens.permute(0, 3, 1, 2)  # [B, D, H, W], the view a SANA block hands its feed-forward
    with torch.no_grad():
        torch.testing.assert_close(ff(spatial), reference(spatial), atol=1e-6, rtol=1e-5)


def test_token_major_ffn_runs_a_wrapped_conv_as_itself():
    """A LoRA layer around a 1x1 conv must not be bypassed by the F.linear shortcut."""
    from tbac_core.modeling.mix_ffn import pointwise

    conv = torch.nn.Conv2d(4, 3, 1)

    class Wrapped(torch.nn.Module):  # what peft's LoRA Conv2d looks like from outside
        def __init__(self):
            super().__init__()
            self.base_layer = conv

        @property
        def weight(self):
            return conv.weight

        def forward(self, x):
            return conv(x) + 1.0

    tokens = torch.randn(1, 2, 2, 4)
    with torch.no_grad():
        plain, wrapped = pointwise(conv, tokens), pointwise(Wrapped(), tokens)
    torch.testing.assert_close(wrapped, plain + 1.0)


def test_token_major_ffn_keeps_the_shortcut_for_an_offloadable_conv(monkeypatch):
    """In ComfyUI every layer is made offloadable (layer_offload): still F.linear, on the weights moved for
    the call, never the conv (PyTorch's CPU im2col path: +23 % per medium step measured before the fix)."""
    from streamed_layers import forbid_calls, stream

    from tbac_core.modeling.mix_ffn import pointwise

    conv = torch.nn.Conv2d(4, 3, 1)
    tokens = torch.randn(1, 2, 2, 4)
    with torch.no_grad():
        plain = pointwise(conv, tokens)
    forbid_calls(monkeypatch, stream(conv))
    with torch.no_grad():
        assert torch.equal(pointwise(conv, tokens), plain)


# -- the accelerations through the one-call methods -----------------------------------------------
def test_generate_and_edit_take_the_accelerations(pipe, conds):
    last_block = pipe.model.dit.transformer.transformer_blocks[-1]
    common = {"steps": STEPS, "width": 64, "height": 64, "seed": 2}
    exact = pipe.generate("a red cat", **common).latents
    assert torch.equal(pipe.generate("a red cat", cache_threshold=0.0, guidance_cutoff=1.0, **common).latents, exact)
    with _Counter(last_block) as last:
        cached = pipe.generate("a red cat", cache_threshold=1.0, cache_max_skips=1, **common).latents
    assert len(last.rows) == STEPS // 2 and not torch.equal(cached, exact)  # every other step is full
    image = Image.new("RGB", (64, 48), (80, 120, 200))
    with _Counter(pipe.model.dit) as dit_calls:
        pipe.edit("make it blue", images=[image], guidance_cutoff=0.5, **common)
    guided = guided_step_count(STEPS, 0.5)
    assert dit_calls.rows == [3] * guided + [1] * (STEPS - guided)
    with pytest.raises(InvalidParameterError, match="cache_threshold"):
        pipe.generate("a red cat", cache_threshold=5.0, **common)
    with pytest.raises(InvalidParameterError, match="cache_max_skips"):
        pipe.generate("a red cat", cache_threshold=0.1, cache_max_skips=0, **common)


# -- independent prompts in one batch (the batch command's throughput mode) ------------------------
def test_prompt_seeds_give_each_prompt_its_own_images(pipe):
    prompts, seeds = ["a red cat", "a blue house", "a green tree"], [3, 11, 7]
    params = SamplingParams(steps=STEPS, num_images_per_prompt=2)
    together = pipe.sample(pipe.encode(prompts), width=64, height=64, params=params, prompt_seeds=seeds,
                           check_memory=True)
    for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = pipe.sample(pipe.encode(prompt), width=64, height=64,
                            params=SamplingParams(steps=STEPS, num_images_per_prompt=2, seed=seed))
        torch.testing.assert_close(together[2 * index:2 * index + 2], alone, atol=1e-4, rtol=0)
    with pytest.raises(InvalidParameterError, match="one seed per prompt"):
        pipe.sample(pipe.encode(prompts), width=64, height=64, params=params, prompt_seeds=[1, 2])
    with pytest.raises(InvalidParameterError, match="seed must be an integer"):
        pipe.sample(pipe.encode(prompts), width=64, height=64, params=params, prompt_seeds=[1, 2, -3])


def test_denoise_memory_check_refuses_a_batch_too_large(pipe, monkeypatch):
    from tbac_core.pipeline import batch_memory

    dit = pipe.model.dit
    per_row = batch_memory.denoise_bytes_per_row(dit, 8, 8)
    assert per_row > 0
    monkeypatch.setattr(batch_memory, "available_bytes", lambda device: 5 * per_row)
    batch_memory.check_denoise_memory(dit, 5, 8, 8)  # fits exactly
    with pytest.raises(InvalidParameterError, match="at most 5 rows fit"):
        batch_memory.check_denoise_memory(dit, 6, 8, 8)
    cond = pipe.encode(["a", "b", "c"])  # 3 prompts x 2 guidance rows = 6 rows
    sampled = []
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **k: sampled.append(1))
    with pytest.raises(InvalidParameterError, match="at most 5 rows fit"):
        pipe.sample(cond, width=64, height=64, params=SamplingParams(steps=STEPS), check_memory=True)
    assert sampled == []  # refused before any latent or step


def test_available_memory_is_read_on_this_machine(pipe):
    from tbac_core.pipeline.batch_memory import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert free is None or free > 0


# -- torch.compile of the DiT ----------------------------------------------------------------------
def test_compile_without_a_compiler_falls_back_with_a_clear_message(monkeypatch, caplog):
    from torch._inductor import config

    from tbac_core.pipeline import compile as dit_compile

    monkeypatch.setattr(config.cpp, "cxx", ("no-such-compiler-xyz",))
    assert "no C++ compiler was found" in dit_compile.compiler_problem(torch.device("cpu"))

    class Blocks:
        compiled = 0

        def compile(self):
            Blocks.compiled += 1

    class FakeDiT:
        class transformer:  # the attribute path of LadderDiT
            transformer_blocks = [Blocks(), Blocks()]

    with caplog.at_level("WARNING"):
        assert dit_compile.compile_dit_blocks(FakeDiT, torch.device("cpu")) is False
    assert Blocks.compiled == 0 and "runs uncompiled" in caplog.text
    monkeypatch.setattr(config.cpp, "cxx", ("sh",))  # any program on PATH counts as found
    assert dit_compile.compile_dit_blocks(FakeDiT, torch.device("cpu")) is True and Blocks.compiled == 2


def test_condition_kv_cache_works_on_inference_tensor_weights(checkpoint_dir):
    # ComfyUI runs its nodes under torch.inference_mode: the loaded weights keep no version counter.
    from tbac_core import load_model

    with torch.inference_mode():
        model = load_model(checkpoint_dir, device="cpu", dtype="float32")
    dit = model.dit
    assert dit.transformer.transformer_blocks[0].attn2.to_k.weight.is_inference()
    width = dit.transformer.transformer_blocks[0].attn2.to_k.in_features
    context = torch.randn(2, dit.num_blocks * 4, width)  # [B, blocks * N, D], N = 4
    cache = ConditionKVCache()
    with torch.no_grad():
        first = cache.block_kv(dit, context, None, ["a"])
        again = cache.block_kv(dit, context.clone(), None, ["a"])
    assert (cache.computed, cache.reused) == (1, 1)
    assert again is first


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dit_dtype_and_device_are_diffusers_answers_without_the_module_walk(checkpoint_dir, dtype):
    from tbac_core import load_model

    dit = load_model(checkpoint_dir, device="cpu", dtype=dtype).dit
    assert (dit.dtype, dit.device) == (dit.transformer.dtype, dit.transformer.device)
    assert dit.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_major_linear_attention_changes_denoising_by_rounding_at_most(checkpoint_dir, dtype):
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from tbac_core import TBACPipeline
    from tbac_core.modeling.linear_attention import TokenMajorLinearAttnProcessor

    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype=dtype)
    cond = pipe.encode("a red cat")
    latents = {}
    for processor in (SanaLinearAttnProcessor2_0, TokenMajorLinearAttnProcessor):
        for block in pipe.model.dit.transformer.transformer_blocks:
            block.attn1.set_processor(processor())
        latents[processor] = _run(pipe, cond, SamplingParams(steps=STEPS, guidance_scale=4.5))
    reference, ours = latents[SanaLinearAttnProcessor2_0], latents[TokenMajorLinearAttnProcessor]
    # Same bits on this project's CPUs (AVX-512, MKL); another BLAS may round the transposed products apart.
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
