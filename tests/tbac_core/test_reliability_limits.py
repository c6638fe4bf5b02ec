"""Issue 15 checks of our own: cache keys, threads, EXIF, counts before work, NaN weights, text."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tbac_core.errors import InvalidParameterError, NonFiniteWeightsError
from tbac_core.params import (
    MAX_BATCH,
    MAX_INPUT_IMAGES,
    MAX_VISION_TOKENS,
    check_text,
    check_vision_budget,
)
from tbac_core.processing import images as image_module


def test_equal_bytes_of_another_shape_or_palette_are_other_inputs(pipe):
    flat = np.arange(48 * 96 * 3, dtype=np.uint8) % 251
    wide, tall = flat.reshape(48, 96, 3), flat.reshape(96, 48, 3)  # same bytes, different images
    a = pipe.encode_prompt("x", images=wide)
    b = pipe.encode_prompt("x", images=tall)
    assert a is not b and not torch.equal(a.sources[0].positive, b.sources[0].positive)
    red, green = Image.new("P", (40, 40), 0), Image.new("P", (40, 40), 0)
    red.putpalette([255, 0, 0] * 256)
    green.putpalette([0, 255, 0] * 256)  # same indices, another palette
    assert pipe.encode_prompt("x", images=red) is not pipe.encode_prompt("x", images=green)
    assert pipe.encode_prompt("x", images=red.copy()) is pipe.encode_prompt("x", images=red)  # equal input: a hit


def test_threads_on_one_pipeline_match_a_single_thread_run(pipe):
    prompts = [f"a {c} square" for c in ("red", "green", "blue", "gray")]
    pipe.clear_cache()
    alone = {p: pipe.encode_prompt(p).sources[0].positive.clone() for p in prompts}
    alone.update({p + "/edit": pipe.encode_prompt(p, images=Image.new("RGB", (32, 32))).sources[0].positive.clone()
                  for p in prompts})
    pipe.clear_cache()
    got, errors = {}, []

    def work(prompt):
        try:
            got[prompt + "/edit"] = pipe.encode_prompt(prompt, images=Image.new("RGB", (32, 32))).sources[0].positive
            got[prompt + "/t2i"] = pipe.encode_prompt(prompt).sources[0].positive
        except BaseException as exc:  # collected: the test thread judges
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert all(torch.equal(got[p + "/t2i"], alone[p]) for p in prompts)
    assert all(torch.equal(got[p + "/edit"], alone[p + "/edit"]) for p in prompts)


def test_exif_rotated_photo_is_upright():
    photo = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    photo.info["exif"] = exif.tobytes()
    import io

    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif.tobytes())
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert image_module.to_pil_rgb(loaded).size == (20, 60)


@pytest.mark.parametrize("images", [
    lambda: torch.rand(MAX_INPUT_IMAGES + 1, 16, 16, 3),  # video frames wired in
    lambda: [Image.new("RGB", (16, 16))] * (MAX_INPUT_IMAGES + 1),
    lambda: [[Image.new("RGB", (16, 16))] * (MAX_INPUT_IMAGES + 1)],
])
def test_too_many_input_images_are_refused_before_any_is_converted(pipe, images, monkeypatch):
    converted = []
    monkeypatch.setattr(image_module, "to_pil_rgb", lambda image: converted.append(image))
    with pytest.raises(InvalidParameterError, match="pick the frames"):
        pipe.encode_prompt("x", images=images())
    assert converted == []


def test_too_many_prompts_are_refused_before_any_is_encoded(pipe, monkeypatch):
    monkeypatch.setattr(pipe.model, "encode", lambda *a, **k: pytest.fail("encoded"))
    with pytest.raises(InvalidParameterError, match=f"batch of {MAX_BATCH + 1} prompts"):
        pipe.encode_prompt(["x"] * (MAX_BATCH + 1))


def test_empty_image_batch_is_refused_not_read_as_text_to_image(pipe):
    with pytest.raises(InvalidParameterError, match="holds no image"):
        pipe.encode_prompt("x", images=torch.zeros(0, 32, 32, 3))


def test_vision_token_budget():
    check_vision_budget(MAX_INPUT_IMAGES, MAX_VISION_TOKENS // MAX_INPUT_IMAGES * 28 * 28)
    with pytest.raises(InvalidParameterError, match="visual tokens"):
        check_vision_budget(2, 10**9)  # a hostile preprocessor min_pixels


def test_lone_surrogates_are_refused_with_their_position():
    with pytest.raises(InvalidParameterError, match="position 1"):
        check_text("a\ud800", "prompt")
    assert check_text("emoji \U0001f600 ok", "prompt")


def test_nan_weights_are_named_not_blamed_on_guidance(checkpoint_dir):
    from tbac_core import TBACPipeline

    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    block = pipe.model.dit.transformer.transformer_blocks[1].attn1.to_k
    with torch.no_grad():
        block.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"not finite.*transformer_blocks\.1\.attn1\.to_k\.weight") as info:
        pipe.generate("x", steps=1, width=32, height=32)
    assert "guidance" not in str(info.value).split("no guidance")[0]
    assert str(checkpoint_dir) in str(info.value)
