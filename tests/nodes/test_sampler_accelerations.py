"""TBAC Sampler's opt-in acceleration inputs: declared last with the library's defaults and limits,
off = the exact result, on = less DiT work, and the values reach the pipeline."""
from __future__ import annotations

import pytest
import torch
from graph_runner import input_specs, make_models_root
from pack import PACK, outputs

bridge = PACK.nodes.comfy_bridge
loader = PACK.nodes.loader
generate = PACK.nodes.generate
params = PACK.tbac_core.params
STEPS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory, fixture_root):
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        (loaded,) = outputs(loader.TBACModelLoader, checkpoint="tbac-tiny", dtype="fp32", device="cpu", adapter="none")
        yield loaded


@pytest.fixture(scope="module")
def cond(model):
    (encoded,) = outputs(generate.TBACLadderEncode, model=model, prompt="a cat", negative_prompt="", layers="default",
                         keep_all_rungs=False, one_prompt_per_line=False, images=None)
    return encoded


def _sample(model, cond, **kwargs):
    options = dict(seed=5, steps=STEPS, guidance=4.5, image_guidance=1.5, width=64, height=64, batch_size=1,
                   sampler="dpm++", denoise=1.0, latent=None)
    options.update(kwargs)
    return outputs(generate.TBACSampler, model=model, conditioning=cond, **options)[0]["samples"]


def test_acceleration_inputs_come_last_with_the_library_defaults_and_limits():
    specs = input_specs(generate.TBACSampler)
    # Saved widget order kept: each new input comes after the older ones.
    assert [spec.name for spec in specs[-3:]] == ["cache_threshold", "guidance_cutoff", "cache_max_skips"]
    cache, cutoff, skips = specs[-3:]
    defaults = params.SamplingParams()
    assert not any(spec.required for spec in (cache, cutoff, skips))  # API prompts saved before them still validate
    assert (cache.options["default"], cache.options["min"], cache.options["max"]) == (
        defaults.cache_threshold, 0.0, params.MAX_CACHE_THRESHOLD)
    assert (cutoff.options["default"], cutoff.options["min"], cutoff.options["max"]) == (
        defaults.guidance_cutoff, 0.0, 1.0)
    assert (skips.options["default"], skips.options["min"], skips.options["max"]) == (
        defaults.cache_max_skips, 1, params.MAX_CACHE_SKIPS)


def test_off_values_are_the_exact_result_and_on_values_skip_work(model, cond):
    dit = model.pipeline.model.dit
    exact = _sample(model, cond)
    assert torch.equal(_sample(model, cond, cache_threshold=0.0, guidance_cutoff=1.0), exact)
    rows = []
    handle = dit.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        truncated = _sample(model, cond, guidance_cutoff=0.5)
    finally:
        handle.remove()
    assert rows == [2, 2, 1, 1]  # negative + positive rows for half the steps, then the positive alone
    assert not torch.equal(truncated, exact)
    last_block = dit.transformer.transformer_blocks[-1]
    calls = []
    handle = last_block.register_forward_pre_hook(lambda _m, args: calls.append(1))
    try:
        _sample(model, cond, cache_threshold=params.MAX_CACHE_THRESHOLD, cache_max_skips=STEPS - 1)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the first step ran the later blocks: the others were estimated


def test_acceleration_values_reach_the_pipeline(model, cond, monkeypatch):
    seen = []
    original = model.pipeline.sample
    monkeypatch.setattr(model.pipeline, "sample", lambda *a, **k: seen.append(k["params"]) or original(*a, **k))
    _sample(model, cond, cache_threshold=0.07, guidance_cutoff=0.8, cache_max_skips=3)
    assert (seen[0].cache_threshold, seen[0].guidance_cutoff, seen[0].cache_max_skips) == (0.07, 0.8, 3)
