"""The native model's diffusion-model call outside ComfyUI (wrappers fall back to a plain call)."""
from __future__ import annotations

import torch
from pack import PACK

native = PACK.nodes.native
ConditionKVCache = PACK.tbac_core.modeling.ConditionKVCache


def test_a_step_with_and_without_the_sampling_runs_keys_values_gives_the_same_prediction(pipe):
    dit = pipe.model.dit
    cond = pipe.encode("a red cat")
    # core's context: each block's condition side by side, negative and positive rows.
    context = torch.cat([torch.cat(cond.block_conditions(branch, dit.embed_condition), dim=1)
                         for branch in ("negative", "positive")])
    latents = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((2,), 500.0)
    diffusion_model = native.LadderDiTDiffusionModel(dit)
    cache = ConditionKVCache()
    run_options = {native.CONDITION_KV_KEY: cache, "uuids": ["negative", "positive"]}
    with torch.no_grad():
        plain = diffusion_model(latents, timesteps, context=context, transformer_options={})
        first = diffusion_model(latents, timesteps, context=context.clone(), transformer_options=run_options)
        second = diffusion_model(latents, timesteps, context=context.clone(), transformer_options=run_options)
        reference = dit(latents, timesteps, list(context.chunk(dit.num_blocks, dim=1)),
                        torch.zeros(2, 1, context.shape[1] // dit.num_blocks))
    assert (cache.computed, cache.reused) == (2, 2)
    assert torch.equal(plain, first) and torch.equal(first, second)
    assert torch.equal(plain, reference)  # diffusers' own cross-attention on the raw conditions
