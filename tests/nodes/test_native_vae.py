"""The DC-AE as a core VAE, and masks of odd-sized pictures, through the comfy_api double (no ComfyUI).

Core VAE Decode / Encode themselves run in ``test_native_comfyui.py`` (real ComfyUI); here: the
first-stage module and pixel conversions core's code calls, the sizes core reads, and the refusal
outside ComfyUI.
"""
from __future__ import annotations

import pytest
import torch
from graph_runner import make_models_root
from pack import PACK, outputs

bridge = PACK.nodes.comfy_bridge
native = PACK.nodes.native
loader = PACK.nodes.loader
generate = PACK.nodes.generate
InvalidParameterError = PACK.tbac_core.errors.InvalidParameterError


def _load(checkpoint: str):
    (loaded,) = outputs(loader.TBACModelLoader, checkpoint=checkpoint, dtype="fp32", device="cpu", adapter="none")
    return loaded


@pytest.fixture(scope="module")
def model(tmp_path_factory, fixture_root):
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        yield _load("tbac-tiny")


@pytest.fixture()
def core_vae(model, monkeypatch):
    """The core VAE object as ComfyUI gets it (outside ComfyUI its base is a plain object, no patcher)."""
    monkeypatch.setattr(bridge, "vae_patcher", lambda managed: None)
    return native.native_vae(model)


def test_native_vae_node_refuses_outside_comfyui(model):
    with pytest.raises(InvalidParameterError, match="only runs inside ComfyUI"):
        outputs(native.TBACNativeVAE, model=model)


def test_core_vae_first_stage_decodes_and_encodes_as_our_nodes(model, core_vae):
    """What core VAE Decode / Encode compute from it: process_output(decode(x)), encode(process_input(px))."""
    images = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    (ours,) = outputs(generate.TBACEncodeImage, model=model, images=images, crop_to_multiple=True)
    with torch.inference_mode():
        latents = core_vae.first_stage_model.encode(core_vae.process_input(images.movedim(-1, 1)))
        pixels = core_vae.process_output(core_vae.first_stage_model.decode(ours["samples"]).float())
    (decoded,) = outputs(generate.TBACDecode, model=model, latent=ours, tiling="off")
    assert torch.allclose(latents, ours["samples"], atol=1e-5, rtol=0)
    assert torch.allclose(pixels.movedim(1, -1), decoded, atol=1e-6, rtol=0)


def test_core_vae_declares_the_dc_aes_sizes(model, core_vae):
    tbac = model.model
    assert (core_vae.latent_channels, core_vae.downscale_ratio, core_vae.upscale_ratio) == (
        tbac.latent_channels, tbac.vae_scale_factor, tbac.vae_scale_factor)
    assert core_vae.vae_dtype == torch.float32 and core_vae.latent_dim == 2 and core_vae.crop_input
    latent_512 = (1, tbac.latent_channels, 512 // tbac.vae_scale_factor, 512 // tbac.vae_scale_factor)
    per_image = core_vae.memory_used_decode(latent_512, torch.float32)
    channels = tbac.vae.config.decoder_block_out_channels[0]
    assert per_image == native.DECODE_ELEMENTS_PER_PIXEL_CHANNEL * channels * 512 * 512 * 4
    assert core_vae.memory_used_decode(latent_512, torch.bfloat16) == per_image // 2
    assert core_vae.memory_used_encode((1, 3, 512, 512), torch.float32) == (
        native.ENCODE_ELEMENTS_PER_PIXEL_CHANNEL * tbac.vae.config.encoder_block_out_channels[0] * 512 * 512 * 4)


def test_inpainting_an_odd_sized_picture_on_the_demo_keeps_the_pixels_outside_the_mask():
    """35x38 on the demo (factor 4): Encode crops to 32x36; the mask painted on the whole picture follows."""
    demo = _load("demo")
    picture = torch.rand(1, 35, 38, 3, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 35, 38)
    mask[:, 5:22, 2:23] = 1.0  # Load Image's MASK: the whole picture, edges off the latent grid
    (encoded,) = outputs(generate.TBACEncodeImage, model=demo, images=picture, crop_to_multiple=True)
    (cond,) = outputs(generate.TBACLadderEncode, model=demo, prompt="a yellow square on a green background",
                      negative_prompt="", layers="default", keep_all_rungs=False, one_prompt_per_line=False)
    (latent,) = outputs(generate.TBACSampler, model=demo, conditioning=cond, seed=7, steps=20, guidance=3.0,
                        image_guidance=1.5, width=32, height=32, batch_size=1, sampler="dpm++", denoise=1.0,
                        latent={**encoded, "noise_mask": mask.reshape(1, 1, 35, 38)})  # SetLatentNoiseMask's layout
    (pasted,) = outputs(generate.TBACDecode, model=demo, latent=latent, tiling="off", original_images=picture)
    cropped = picture[:, 1:33, 1:37]  # crop_to_multiple: (35 % 4) // 2 rows, (38 % 4) // 2 columns off
    outside = mask[0, 1:33, 1:37] == 0
    levels = ((pasted - cropped) * 255).round().abs()
    assert pasted.shape == (1, 32, 36, 3)
    assert levels[:, outside].max() <= 1
    assert levels[:, ~outside].max() > 8  # the painted region did change
