"""Bad input, untrusted files, cancellation and long queues (issue 9)."""
from __future__ import annotations

import gc
import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tbac_core.errors import (
    CheckpointError,
    InvalidParameterError,
    NonFiniteOutputError,
)
from tbac_core.loading.folders import list_checkpoints, resolve_checkpoint
from tbac_core.params import SamplingParams, check_size
from tbac_core.processing.prompt_layout import metaquery_positions

SPECIAL = ["<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|img0|>", "<|img7|>",
           "<|image_pad|>", "<|video_pad|>", "<|endoftext|>", "<|pad_token_3|>", "assistant\n", "\n"]


# -- model files ---------------------------------------------------------------------------
def test_checkpoint_names_cannot_escape_the_model_folders(tmp_path, fixture_root):
    root = tmp_path / "tbac"
    root.mkdir()
    (root / "mine").symlink_to(fixture_root / "checkpoint")  # a user's own link is followed
    assert list(list_checkpoints([root])) == ["mine"]
    assert resolve_checkpoint("mine", [root]) == root / "mine"
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ["../outside", str(fixture_root / "checkpoint"), "mine/../../outside", "mine/..", "", "."]:
        with pytest.raises(CheckpointError, match="Available: mine"):
            resolve_checkpoint(name, [root])


# -- prompts -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=12)), max_size=12),
       st.integers(min_value=0, max_value=2))
def test_special_token_soup_never_moves_metaquery_or_image_slots(pipe, pieces, num_images):
    model = pipe.model
    text = "".join(pieces)
    images = [Image.new("RGB", (56, 84), (9, 9, 9))] * num_images
    rows = [(model.prompts.truncate_caption(text), images), ("short", images)]
    batch = model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
    ids = batch["input_ids"]
    n = model.config.num_metaqueries
    positions = metaquery_positions(ids, model.prompts.ids, n)
    seq = ids.shape[1]
    assert positions.tolist() == [list(range(seq - n - 2, seq - 2))] * 2
    expected_queries = torch.arange(model.base_vocab, model.base_vocab + n)
    assert torch.equal(ids[:, seq - n - 2: seq - 2], expected_queries.expand(2, n))
    special = model.prompts.ids
    for row in ids:
        row = row[row != special.pad]
        assert int((row == special.im_start).sum()) == 3
        assert int((row == special.im_end).sum()) == 3  # system, user, metaquery suffix
        assert int((row == special.vision_start).sum()) == num_images + 1
        pads = int((row == special.image_pad).sum())
        assert pads == sum(model.prompts.tokens_per_image(batch["image_grid_thw"][:num_images])) if num_images else pads == 0
        assert int((row >= model.base_vocab).sum()) == n


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = "word " * 400
    with caplog.at_level(logging.WARNING, logger="tbac_core.processing.prompting"):
        caption = pipe.model.prompts.truncate_caption(long_prompt)
    assert len(pipe.model.prompts.text_ids(caption)) == pipe.model.config.max_input_text_tokens
    assert "only the first 256 are used" in caplog.text


# -- images --------------------------------------------------------------------------------
def _rgb(size, mode="RGB"):
    return Image.new(mode, size, 200 if mode in ("L", "I;16") else (200, 30, 30) + ((128,) if mode == "RGBA" else ()))


@pytest.mark.parametrize("image", [
    _rgb((64, 64), "RGBA"), _rgb((40, 30), "L"), _rgb((1, 1)), _rgb((3000, 2000)),
    Image.fromarray(np.full((32, 32), 60000, dtype=np.uint16)),
    torch.rand(48, 80, 3), torch.rand(48, 80, 4), np.zeros((20, 20), dtype=np.uint8),
], ids=["rgba", "grey", "1x1", "large", "16bit", "tensor", "tensor-rgba", "numpy-grey"])
def test_odd_images_are_converted(pipe, image):
    cond = pipe.encode("describe", images=[image])
    assert torch.isfinite(cond.sources[0].positive).all()


def test_sixteen_bit_is_scaled_not_clipped(pipe):
    bright = pipe.model.prompts.prepare_image(Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)))
    assert 110 <= np.asarray(bright)[0, 0, 0] <= 125  # 30000 / 65535 * 255 ~ 117, not clipped to 255


@pytest.mark.parametrize("image, message", [
    (torch.full((8, 8, 3), float("nan")), "NaN"),
    (torch.rand(8, 8, 2), "not \\[H, W, C\\]"),
    (Image.new("RGB", (10000, 20)), "aspect ratio"),
    ("photo.png", "Unsupported image type"),
])
def test_garbage_images_refused(pipe, image, message):
    with pytest.raises(InvalidParameterError, match=message):
        pipe.encode("x", images=[image])


def test_mixed_size_edit_batch(pipe):
    cond = pipe.encode(["a", "b"], images=[[_rgb((64, 32))], [_rgb((30, 90)), _rgb((64, 64))]])
    assert cond.sources[0].num_input_images == (1, 2)
    assert torch.isfinite(pipe.sample(cond, params=SamplingParams(steps=1))).all()


# -- numbers -------------------------------------------------------------------------------
@given(st.integers(min_value=-10_000, max_value=10_000), st.integers(min_value=-10_000, max_value=10_000))
def test_size_validator(width, height):
    valid = all(8 <= v <= 4096 and v % 8 == 0 for v in (width, height))
    if valid:
        check_size(width, height, 8)
    else:
        with pytest.raises(InvalidParameterError):
            check_size(width, height, 8)


@given(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True),
       st.integers(min_value=-(2**70), max_value=2**70))
def test_parameter_validator(steps, guidance, denoise, seed):
    params = SamplingParams(steps=steps, guidance_scale=guidance, denoise=denoise, seed=seed)
    valid = (1 <= steps <= 1000 and np.isfinite(guidance) and np.isfinite(denoise) and 0 < denoise <= 1
             and 0 <= seed < 2**64)
    if valid:
        params.validate()
    else:
        with pytest.raises(InvalidParameterError):
            params.validate()


# -- runs ----------------------------------------------------------------------------------
class Cancelled(BaseException):
    pass


def test_cancel_during_encoding_then_next_run_works(pipe):
    calls = []

    def check_cancel():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    pipe.clear_cache()
    with pytest.raises(Cancelled):
        pipe.encode("cancel me please", check_cancel=check_cancel)
    assert len(calls) == 3  # stopped at the third decoder layer, not after the whole MLLM
    assert not pipe.model.mllm.model._forward_hooks and not pipe.model.mllm.model._forward_pre_hooks
    assert torch.isfinite(pipe.generate("cancel me please", steps=1).latents).all()


def test_cancel_before_decoding(pipe):
    steps = []

    def check_cancel():
        if len(steps) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate("x", steps=2, callback=steps.append, check_cancel=check_cancel)


def test_nan_generation_is_refused(pipe, monkeypatch):
    dit = pipe.model.dit
    monkeypatch.setattr(type(dit), "forward", lambda self, x, *a, **k: torch.full_like(x, float("nan")))
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        pipe.generate("x", steps=2)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_fifty_generations_keep_memory_flat(pipe):
    for index in range(5):  # warm up allocator and caches
        pipe.generate(f"warm {index}", steps=2, seed=index)
    gc.collect()
    before = _rss_mb()
    for index in range(50):
        pipe.generate(f"prompt {index}", steps=2, seed=index)
    gc.collect()
    growth = _rss_mb() - before
    assert growth < 40, f"RSS grew by {growth:.1f} MB over 50 generations"
    assert len(pipe._cache) <= pipe.cache_size
