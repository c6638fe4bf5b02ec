"""The pipeline's boundary: check_inputs refuses everything before any work; the cache and threads are safe."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tbac_core.errors import InvalidParameterError, LayerSpecError
from tbac_core.modeling import model as model_module
from tbac_core.params import MAX_BATCH, SamplingParams
from tbac_core.pipeline import TBACPipeline


@pytest.fixture
def no_mllm(pipe, monkeypatch):
    """Fail the test if the MLLM (or the DiT) would run."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the inputs were checked")

    monkeypatch.setattr(pipe.model, "encode", refuse)
    monkeypatch.setattr(pipe.placement, "use", refuse)
    return TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate(["x"] * 1000, steps=1), "batch of 1000"),
    (lambda p: p.generate("x", steps=1, num_images_per_prompt=MAX_BATCH + 1), f"batch of {MAX_BATCH + 1}"),
    (lambda p: p.generate(None, steps=1), "prompt must be a string"),
    (lambda p: p.generate(["ok", None], steps=1), "Prompts must be strings"),
    (lambda p: p.generate(42, steps=1), "prompt must be a string"),
    (lambda p: p.generate([], steps=1), "No prompt"),
    (lambda p: p.generate("x", negative_prompt=None, steps=1), "negative_prompt"),
    (lambda p: p.generate("x", steps=0), "steps"),
    (lambda p: p.generate("x", steps=1, seed=True), "seed"),
    (lambda p: p.generate("x", steps=1, width=65), "multiple of 8"),
    (lambda p: p.generate("x", steps=1, layers="99"), "99"),
    (lambda p: p.edit("x", [torch.full((8, 8, 3), float("nan"))], steps=1), "NaN"),
    (lambda p: p.edit(["a", "b"], [[Image.new("RGB", (8, 8))]], steps=1), "image lists for 1 prompts"),
    (lambda p: p.encode_prompt(None), "prompt must be a string"),
    (lambda p: p.encode_prompt("x", images=[Image.new("RGB", (0, 0))]), "empty"),
])
def test_refused_before_any_work(no_mllm, call, message):
    with pytest.raises((InvalidParameterError, LayerSpecError), match=message):
        call(no_mllm)


def test_layer_spec_parsed_once_per_job(pipe, monkeypatch):
    calls = []
    original = model_module.parse_layer_spec
    monkeypatch.setattr(model_module, "parse_layer_spec", lambda *a: calls.append(a) or original(*a))
    TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement).generate("x", steps=1, layers="last 2")
    assert len(calls) == 1


def test_check_inputs_normalises(pipe):
    checked = pipe.check_inputs("a cat", [np.zeros((16, 16, 3), dtype=np.uint8)], params=SamplingParams())
    assert checked.prompts == ["a cat"] and checked.images[0][0].mode == "RGB"
    size = pipe.model.config.default_image_size
    assert (checked.width, checked.height) == (size, size)
    assert checked.block_rungs == pipe.model.default_block_rungs()


# -- the conditioning cache never returns a result for different input -------------------------
def _cond_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(
        (a.sources[0].positive, a.sources[0].image_negative), (b.sources[0].positive, b.sources[0].image_negative)))


def test_cache_keys_arrays_by_shape_too(pipe):
    cached = TBACPipeline(pipe.model, cache_size=8, placement=pipe.placement)
    fresh = TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement)
    pixels = np.random.default_rng(0).integers(0, 255, (32 * 64 * 3,), dtype=np.uint8)
    wide, tall = pixels.reshape(32, 64, 3), pixels.reshape(64, 32, 3)  # same bytes, other image
    cached.encode_prompt("x", images=[wide])
    assert _cond_equal(cached.encode_prompt("x", images=[tall]), fresh.encode_prompt("x", images=[tall]))
    as_float = wide.astype(np.float32) / 255  # other dtype, same picture: may share, must be right
    assert _cond_equal(cached.encode_prompt("x", images=[as_float]), fresh.encode_prompt("x", images=[as_float]))


def test_cache_keys_palette_images_by_their_colours(pipe):
    cached = TBACPipeline(pipe.model, cache_size=8, placement=pipe.placement)
    fresh = TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement)
    indices = Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 4, mode="L")
    red, blue = indices.convert("P"), indices.convert("P")
    red.putpalette([255, 0, 0] * 4 + [0] * 756)
    blue.putpalette([0, 0, 255] * 4 + [0] * 756)
    assert red.tobytes() == blue.tobytes()  # the same indices
    cached.encode_prompt("x", images=[red])
    assert _cond_equal(cached.encode_prompt("x", images=[blue]), fresh.encode_prompt("x", images=[blue]))


def test_cache_keys_the_grouping_per_prompt(pipe):
    a, b = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    cached = TBACPipeline(pipe.model, cache_size=8, placement=pipe.placement)
    first = cached.encode_prompt(["p", "q"], images=[[a, b], [a]])
    second = cached.encode_prompt(["p", "q"], images=[[a], [b, a]])
    assert first is not second and first.sources[0].num_input_images != second.sources[0].num_input_images


# -- threads ------------------------------------------------------------------------------------
def test_threads_encoding_on_one_model_match_single_thread(pipe):
    prompts = [f"prompt number {i}" for i in range(6)]
    image = Image.new("RGB", (48, 32), (10, 200, 30))
    jobs = [(p, [image] if i % 2 else None) for i, p in enumerate(prompts)]
    single = TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement)
    expected = [single.encode_prompt(p, images=imgs, layers="last 2") for p, imgs in jobs]

    shared = TBACPipeline(pipe.model, cache_size=0, placement=pipe.placement)
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(index):
        try:
            start.wait()
            prompt, imgs = jobs[index]
            results[index] = shared.encode_prompt(prompt, images=imgs, layers="last 2")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads)
    for got, want in zip(results, expected):
        assert torch.equal(got.sources[0].positive, want.sources[0].positive)
        assert torch.equal(got.sources[0].negative, want.sources[0].negative)
    assert not pipe.model.mllm.model._forward_hooks and not pipe.model.mllm.model._forward_pre_hooks
