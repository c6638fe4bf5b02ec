"""Inpainting and masked edits on the demo model: outside the mask nothing changes."""
from __future__ import annotations

import pytest
import torch

from tbac_core.demo import DEMO_CHECKPOINT, demo_defaults
from tbac_core.errors import InvalidParameterError
from tbac_core.params import SamplingParams
from tbac_core.pipeline import composite_pixels, resize_mask
from tbac_core.processing.images import images_to_uint8

DEFAULTS = demo_defaults()


@pytest.fixture(scope="module")
def demo_pipe():
    from tbac_core import TBACPipeline

    return TBACPipeline.from_pretrained(DEMO_CHECKPOINT, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def source(demo_pipe):
    """A demo picture (pixels [1, 32, 32, 3]) and its latents."""
    params = SamplingParams(steps=DEFAULTS["steps"], guidance_scale=DEFAULTS["guidance_scale"], seed=3)
    cond = demo_pipe.encode("a red circle on a blue background")
    latents = demo_pipe.sample(cond, width=32, height=32, params=params)
    pixels = demo_pipe.decode(latents)
    return pixels, demo_pipe.encode_image(pixels)


def _left_half_mask(size=32) -> torch.Tensor:
    mask = torch.zeros(1, size, size)  # [B, H, W] at pixel resolution, as a core MASK
    mask[:, :, : size // 2] = 1.0
    return mask


def _max_level_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((torch.from_numpy(images_to_uint8(a)).int() - torch.from_numpy(images_to_uint8(b)).int()).abs().max())


@pytest.mark.parametrize("edit", [False, True], ids=["inpaint", "masked-edit"])
def test_pixels_outside_the_mask_are_unchanged(demo_pipe, source, edit):
    pixels, latents = source
    mask = _left_half_mask()
    if edit:
        from PIL import Image

        image = Image.fromarray(images_to_uint8(pixels)[0])
        cond = demo_pipe.encode("make the background purple", images=[image])
        params = SamplingParams(steps=DEFAULTS["steps"], guidance_scale=DEFAULTS["guidance_scale"],
                                image_guidance_scale=1.5, seed=7)
    else:
        cond = demo_pipe.encode("a yellow square on a green background")
        params = SamplingParams(steps=DEFAULTS["steps"], guidance_scale=DEFAULTS["guidance_scale"], seed=7)
    result = demo_pipe.sample(cond, params=params, init_latents=latents, noise_mask=mask)

    keep = resize_mask(mask, 1, *latents.shape[-2:]) == 0
    assert torch.equal(result[keep.expand_as(result)], latents[keep.expand_as(latents)])  # latents: exact
    decoded = demo_pipe.decode(result)
    composited = composite_pixels(decoded, pixels, mask)
    outside = (mask[0] == 0)
    assert _max_level_diff(composited[:, outside], pixels[:, outside]) <= 1
    assert _max_level_diff(composited[:, ~outside], pixels[:, ~outside]) > 8  # the masked half did change


def test_a_mask_needs_init_latents_and_a_matching_batch(demo_pipe, source):
    _, latents = source
    cond = demo_pipe.encode("a red circle on a blue background")
    params = SamplingParams(steps=2)
    with pytest.raises(InvalidParameterError, match="needs the latents"):
        demo_pipe.sample(cond, width=32, height=32, params=params, noise_mask=_left_half_mask())
    with pytest.raises(InvalidParameterError, match="expected 1 or 1"):
        demo_pipe.sample(cond, params=params, init_latents=latents, noise_mask=torch.ones(2, 32, 32))
    with pytest.raises(InvalidParameterError, match="must be"):
        resize_mask(torch.ones(1, 2, 4, 4), 1, 4, 4)


def test_a_mask_of_the_uncropped_picture_follows_the_encoders_crop():
    """35x38 crops to 32x36 (factor 4: one row / column off the top / left): the mask is cut alike."""
    from tbac_core.pipeline.masking import crop_like_image, inpaint_blend
    from tbac_core.processing import crop_to_multiple

    mask = (torch.rand(1, 35, 38, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    cropped = crop_to_multiple(mask[..., None], 4)[..., 0]  # as 'TBAC Encode Image' cuts the picture
    assert torch.equal(crop_like_image(mask, 32, 36, 4)[:, 0], cropped) and cropped.shape == (1, 32, 36)
    assert torch.equal(crop_like_image(cropped, 32, 36, 4)[:, 0], cropped)  # already cropped: kept
    latent_sized = torch.rand(1, 8, 9)
    assert torch.equal(crop_like_image(latent_sized, 32, 36, 4)[:, 0], latent_sized)  # other sizes: resized later
    init, noise = torch.zeros(1, 2, 8, 9), torch.randn(1, 2, 8, 9)
    aligned = inpaint_blend(mask, init, noise, factor=4).mask
    assert torch.equal(aligned, inpaint_blend(cropped, init, noise).mask)
    assert not torch.equal(aligned, inpaint_blend(mask, init, noise).mask)  # without the crop: shifted
    pixels = torch.rand(1, 32, 36, 3)
    assert torch.equal(composite_pixels(pixels, pixels * 0, mask, factor=4), composite_pixels(pixels, pixels * 0, cropped))


def test_inpainting_a_picture_of_an_odd_size_keeps_every_pixel_outside_the_mask(demo_pipe):
    """Pipeline level, 35x38 on the demo model: sampled inside the aligned mask only, pasted back outside."""
    from tbac_core.pipeline.masking import crop_like_image
    from tbac_core.processing import crop_to_multiple

    picture = torch.rand(1, 35, 38, 3, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 35, 38)
    mask[:, 5:22, 2:23] = 1.0  # painted on the whole picture; its edges are not on the latent grid
    pixels = crop_to_multiple(picture, demo_pipe.vae_scale_factor)
    latents = demo_pipe.encode_image(pixels)
    cond = demo_pipe.encode("a yellow square on a green background")
    params = SamplingParams(steps=DEFAULTS["steps"], guidance_scale=DEFAULTS["guidance_scale"], seed=7)
    result = demo_pipe.sample(cond, params=params, init_latents=latents, noise_mask=mask)
    keep = resize_mask(crop_like_image(mask, 32, 36, 4), 1, *latents.shape[-2:]) == 0
    assert torch.equal(result[keep.expand_as(result)], latents[keep.expand_as(latents)])
    composited = composite_pixels(demo_pipe.decode(result), pixels, mask, factor=demo_pipe.vae_scale_factor)
    outside = crop_like_image(mask, 32, 36, 4)[0, 0] == 0
    assert _max_level_diff(composited[:, outside], pixels[:, outside]) <= 1
    assert _max_level_diff(composited[:, ~outside], pixels[:, ~outside]) > 8
