"""Run inside a real ComfyUI's Python: core samplers on the native TBAC model vs our sampler.

    python native_parity.py COMFYUI_DIR PACK_ROOT FIXTURE_ROOT   -> one JSON line of figures

Imports ComfyUI as its server does (``--cpu``), then the pack as ComfyUI loads a custom node, and
drives the real ``comfy.sample`` / ``comfy.samplers`` / ``nodes.common_ksampler`` / DualCFG guider /
``latent_preview`` code. Used by ``tests/nodes/test_native_comfyui.py``.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

comfy_dir, pack_root, fixture_root = (Path(arg) for arg in sys.argv[1:4])
# This folder holds the tests' comfy_api double: the real one must win.
HERE = Path(__file__).resolve().parent
sys.path = [str(comfy_dir)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.argv = ["main.py", "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402
import comfy.model_management  # noqa: E402, F401
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402, F401
import latent_preview  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_custom_sampler import Guider_DualCFG  # noqa: E402
from PIL import Image  # noqa: E402

import nodes as core_nodes  # noqa: E402

spec = importlib.util.spec_from_file_location("tbac_native_check", pack_root / "__init__.py",
                                              submodule_search_locations=[str(pack_root)])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
bridge, native, generate = pack.nodes.comfy_bridge, pack.nodes.native, pack.nodes.generate
SamplingParams = pack.tbac_core.params.SamplingParams
assert bridge.IN_COMFYUI

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
figures["sampler_node_previews_when_off"] = sent
print("FIGURES " + json.dumps(figures))
