"""The one normaliser of image inputs: shapes of a job's images, conversions, refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tbac_core.errors import InvalidParameterError
from tbac_core.processing.images import (
    image_batch,
    image_list,
    images_per_prompt,
    to_pil_rgb,
)


def _pil(color=(200, 30, 30), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_list_shapes():
    one = _pil()
    assert image_list(None) == []
    assert image_list(one) == [one]
    assert image_list([one, one]) == [one, one]
    assert len(image_list(torch.rand(3, 8, 8, 3))) == 3  # a ComfyUI IMAGE batch: three images
    assert len(image_list(np.zeros((2, 8, 8, 3), dtype=np.uint8))) == 2


def test_images_per_prompt_shapes():
    a, b = _pil(), _pil((0, 0, 255))
    assert images_per_prompt(None, 2) is None
    assert images_per_prompt([], 2) is None and images_per_prompt([None], 2) is None
    shared = images_per_prompt([a, b], 3)
    assert len(shared) == 3 and all(imgs == [a, b] for imgs in shared)
    assert images_per_prompt(a, 2) == [[a], [a]]
    assert images_per_prompt([[a], [a, b]], 2) == [[a], [a, b]]
    batch = images_per_prompt(torch.rand(2, 8, 8, 3), 1)
    assert len(batch[0]) == 2 and all(img.mode == "RGB" for img in batch[0])
    with pytest.raises(InvalidParameterError, match="image lists for 1 prompts but 2"):
        images_per_prompt([[a]], 2)
    with pytest.raises(InvalidParameterError, match="at least one input image"):
        images_per_prompt([[a], []], 2)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (60, 20), (10, 20, 30))
    wide.putpixel((0, 0), (255, 255, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo held upright
    buffer = io.BytesIO()
    wide.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    photo = Image.open(io.BytesIO(buffer.getvalue()))
    assert photo.size == (60, 20)
    assert to_pil_rgb(photo).size == (20, 60)
    plain = _pil()
    assert to_pil_rgb(plain) is plain  # no orientation tag: no copy


@pytest.mark.parametrize("image, message", [
    (Image.new("RGB", (0, 0)), "empty"),
    (Image.new("RGB", (0, 12)), "empty"),
    (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    (torch.full((8, 8, 3), float("nan")), "NaN"),
    (np.full((8, 8, 3), np.inf, dtype=np.float32), "NaN or infinite"),
])
def test_bad_images_refused(image, message):
    with pytest.raises(InvalidParameterError, match=message):
        images_per_prompt([image], 1)


def test_bfloat16_and_float16_tensors_are_converted():
    image = torch.rand(16, 16, 3)
    expected = np.asarray(to_pil_rgb(image))
    for dtype in (torch.bfloat16, torch.float16):
        converted = np.asarray(to_pil_rgb(image.to(dtype)))
        assert np.abs(converted.astype(int) - expected).max() <= 2


def test_image_batch():
    pixels = torch.rand(2, 16, 24, 3)
    assert torch.equal(image_batch(pixels), pixels)  # float tensors keep their precision
    assert image_batch(pixels[0]).shape == (1, 16, 24, 3)
    assert image_batch(pixels.to(torch.bfloat16)).dtype == torch.float32
    assert image_batch([_pil(), _pil()]).shape == (2, 30, 40, 3)
    with pytest.raises(InvalidParameterError, match="NaN"):
        image_batch(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(InvalidParameterError, match="share one size"):
        image_batch([_pil(size=(8, 8)), _pil(size=(16, 8))])
    with pytest.raises(InvalidParameterError, match="No image"):
        image_batch([])
