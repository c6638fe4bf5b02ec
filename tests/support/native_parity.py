"""Run inside a real ComfyUI's Python: core samplers on the native TBAC model vs our sampler.

    python native_parity.py COMFYUI_DIR PACK_ROOT FIXTURE_ROOT   -> one JSON line of figures

Imports ComfyUI as its server does (``--cpu``), then the pack as ComfyUI loads a custom node, and
drives the real ``comfy.sample`` / ``comfy.samplers`` / ``nodes.common_ksampler`` / DualCFG guider /
``latent_preview`` code. Used by ``tests/nodes/test_native_comfyui.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import real_comfyui

comfy_dir, pack_root, fixture_root = (Path(arg) for arg in sys.argv[1:4])
real_comfyui.import_comfyui(comfy_dir)
import comfy.cli_args
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
from PIL import Image

import nodes as core_nodes

pack = real_comfyui.import_pack(pack_root)
bridge, native, generate = pack.nodes.comfy_bridge, pack.nodes.native, pack.nodes.generate
SamplingParams = pack.tbac_core.params.SamplingParams

with torch.inference_mode():  # as ComfyUI runs its nodes: the weights are inference tensors
    tbac = pack.tbac_core.load_model(
        fixture_root / "checkpoint", device="cpu", dtype="float32", models_dirs=[fixture_root])
model = bridge.ManagedModel(tbac, bridge.devices_for("cpu"), "tbac-tiny")
patcher = native.native_model(model)
STEPS, SEED, G, IG, SIZE = 6, 5, 4.5, 1.5, 64
figures = {}


def native_inputs(cond):
    (positive, negative, image_only) = native.TBACToConditioning.execute(model, cond, 1).args
    latent = torch.zeros(1, tbac.latent_channels, SIZE // tbac.vae_scale_factor, SIZE // tbac.vae_scale_factor)
    return positive, negative, image_only, latent, comfy.sample.prepare_noise(latent, SEED)


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


# 1. text-to-image: core euler + our sigmas (SamplerCustom's path) vs our Euler.
cond = model.pipeline.encode("a red cat")
ours = model.pipeline.sample(cond, width=SIZE, height=SIZE,
                             params=SamplingParams(steps=STEPS, guidance_scale=G, sampler="euler", seed=SEED))
positive, negative, image_only, latent, noise = native_inputs(cond)
sigmas = native.flow_sigmas(tbac.scheduler_config, "euler", STEPS)
core = comfy.sample.sample_custom(patcher, noise, G, comfy.samplers.sampler_object("euler"), sigmas,
                                  positive, negative, latent, seed=SEED)
figures["t2i_euler_max_diff"] = max_diff(core, ours)

# 2. core KSampler itself (euler / simple): its own schedule, so close to ours but not equal.
(out,) = core_nodes.common_ksampler(patcher, SEED, STEPS, G, "euler", "simple", positive, negative,
                                    {"samples": latent})
figures["ksampler_simple_vs_ours_max_diff"] = max_diff(out["samples"], ours)
figures["ksampler_shape"] = list(out["samples"].shape)

# 3. 3-way edit guidance through core's DualCFG guider vs our Euler edit.
image = Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 255)
                        .to(torch.uint8).numpy())
edit = model.pipeline.encode("make it purple", images=[image])
ours_edit = model.pipeline.sample(edit, width=SIZE, height=SIZE, params=SamplingParams(
    steps=STEPS, guidance_scale=G, image_guidance_scale=IG, sampler="euler", seed=SEED))
positive, negative, image_only, latent, noise = native_inputs(edit)
guider = Guider_DualCFG(patcher)
guider.set_conds(positive, image_only, negative)
guider.set_cfg(G, IG, nested=False)
core_edit = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=SEED)
figures["edit_3way_dualcfg_max_diff"] = max_diff(core_edit, ours_edit)

# 4. core KSampler with a noise mask: the unmasked latents stay the input's.
init = model.pipeline.encode_image(torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1)))
mask = torch.zeros(1, SIZE, SIZE)
mask[:, :, : SIZE // 2] = 1.0
(masked,) = core_nodes.common_ksampler(patcher, SEED, STEPS, G, "euler", "simple", positive, negative,
                                       {"samples": init, "noise_mask": mask})
keep = comfy.utils.reshape_mask(mask, init.shape) == 0
figures["ksampler_mask_outside_max_diff"] = max_diff(masked["samples"][keep], init[keep])

# 5. previews: core's Latent2RGB previewer with our fitted factors; our sampler node through the real bar.
comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
previewer = latent_preview.get_previewer("cpu", patcher.model.latent_format)
kind, picture, size = previewer.decode_latent_to_preview_image("JPEG", ours)
figures["core_preview"] = [kind, picture.mode, list(picture.size), size]
sent = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: sent.append(preview))
generate.TBACSampler.execute(model, cond, SEED, 2, G, 1.0, 96, SIZE, 1, "euler", 1.0)
figures["sampler_node_previews"] = [[p[0], p[1].mode, list(p[1].size), p[2]] for p in sent]
comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.NoPreviews
sent.clear()
generate.TBACSampler.execute(model, cond, SEED, 2, G, 1.0, 96, SIZE, 1, "euler", 1.0)
figures["sampler_node_previews_when_off"] = list(sent)
comfy.utils.set_progress_bar_global_hook(None)

# 6. the DC-AE as a core VAE: core VAE Encode / Decode and their tiled variants vs our encode / decode.
# 128 px = 16x16 latents on the tiny fixture (f = 8), so 64 px tiles (8 latents) really tile; the odd
# sizes check that core's encode crop is ours ('TBAC Encode Image' crop_to_multiple).
with torch.inference_mode():
    vae = native.TBACNativeVAE.execute(model).args[0]
    factor = tbac.vae_scale_factor
    pixels = torch.rand(2, 128 + 5, 128 + factor - 1, 3, generator=torch.Generator().manual_seed(2))
    ours_latents = model.pipeline.encode_image(pack.tbac_core.processing.crop_to_multiple(pixels, factor))
    ours_images = model.pipeline.decode(ours_latents, tiled=False)
    (core_latent,) = core_nodes.VAEEncode().encode(vae, pixels)
    (core_images,) = core_nodes.VAEDecode().decode(vae, {"samples": ours_latents})
    (tiled_latent,) = core_nodes.VAEEncodeTiled().encode(vae, pixels, tile_size=64, overlap=16)
    (tiled_images,) = core_nodes.VAEDecodeTiled().decode(vae, {"samples": ours_latents}, tile_size=64, overlap=16)
    # Tiles as large as the image (core's three passes included): the tiled code path, one tile each.
    (one_tile_latent,) = core_nodes.VAEEncodeTiled().encode(vae, pixels, tile_size=256, overlap=0)
    (one_tile_images,) = core_nodes.VAEDecodeTiled().decode(vae, {"samples": ours_latents}, tile_size=256, overlap=0)
    figures["vae_encode_one_tile_max_diff"] = max_diff(one_tile_latent["samples"], ours_latents)
    figures["vae_decode_one_tile_max_diff"] = max_diff(one_tile_images, ours_images)
    figures["vae_shapes"] = [list(core_latent["samples"].shape), list(core_images.shape), list(tiled_images.shape)]
    figures["vae_encode_max_diff"] = max_diff(core_latent["samples"], ours_latents)
    figures["vae_decode_max_diff"] = max_diff(core_images, ours_images)
    figures["vae_encode_tiled_max_diff"] = max_diff(tiled_latent["samples"], ours_latents)
    figures["vae_decode_tiled_max_diff"] = max_diff(tiled_images, ours_images)
    figures["vae_decode_tiled_mean_diff"] = float((tiled_images - ours_images).abs().mean())
    figures["vae_encode_tiled_latent_std"] = float(ours_latents.std())
    # core's KSampler latents decode through the core VAE as through 'TBAC Decode'.
    figures["vae_decodes_ksampler_latents_max_diff"] = max_diff(
        core_nodes.VAEDecode().decode(vae, out)[0], model.pipeline.decode(out["samples"], tiled=False))
    figures["vae_memory_decode_512_bytes"] = vae.memory_used_decode((1, tbac.latent_channels, 512 // factor,
                                                                     512 // factor), torch.float32)
    figures["vae_patcher_is_the_placements"] = vae.patcher is bridge.vae_patcher(model)

# 7. the conditions' cross-attention keys/values: computed once per condition in a sampling run.
runs = []


class RecordingKVCache(native.ConditionKVCache):
    def __init__(self):
        super().__init__()
        runs.append(self)


native.ConditionKVCache = RecordingKVCache
dit_calls = []
counter = tbac.dit.register_forward_pre_hook(lambda module, args: dit_calls.append(args[0].shape[0]))
positive, negative, image_only, latent, noise = native_inputs(cond)
LONG = 20
long_sigmas = native.flow_sigmas(tbac.scheduler_config, "euler", LONG)
core = comfy.sample.sample_custom(patcher, noise, G, comfy.samplers.sampler_object("euler"), long_sigmas,
                                  positive, negative, latent, seed=SEED)
figures["kv_cache_runs"] = len(runs)
figures["kv_cache_computed_reused"] = [runs[-1].computed, runs[-1].reused]
figures["kv_cache_gone_after_sampling"] = native.CONDITION_KV_KEY not in patcher.model_options["transformer_options"]
figures["plain_dit_calls"] = len(dit_calls)

# 8. core EasyCache on the native model: off (threshold 0) changes nothing, on it skips DiT calls.
for threshold in (0.0, 0.5):
    (cached_patcher,) = EasyCacheNode.execute(patcher, threshold, 0.15, 0.95, False).args
    dit_calls.clear()
    out = comfy.sample.sample_custom(cached_patcher, noise, G, comfy.samplers.sampler_object("euler"), long_sigmas,
                                     positive, negative, latent, seed=SEED)
    figures[f"easycache_{threshold}_dit_calls"] = len(dit_calls)
    figures[f"easycache_{threshold}_max_diff"] = max_diff(out, core)
(lazy_patcher,) = LazyCacheNode.execute(patcher, 0.5, 0.15, 0.95, False).args
dit_calls.clear()
comfy.sample.sample_custom(lazy_patcher, noise, G, comfy.samplers.sampler_object("euler"), long_sigmas,
                           positive, negative, latent, seed=SEED)
figures["lazycache_0.5_dit_calls"] = len(dit_calls)
counter.remove()
print("FIGURES " + json.dumps(figures))
