"""Numerical parity with the official implementation on the tiny fixture's golden cases.

Integers must match exactly, float32 tensors within 1e-4, uint8 images within one level. Each case
runs twice: as the library runs it, and with every float32 product through oneDNN (``onednn_linear``
takes only products of 8 M multiply-adds or more, none of which the tiny model has).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tbac_core.modeling import onednn_linear
from tbac_core.params import SamplingParams
from tbac_core.processing.images import images_per_prompt
from tbac_core.processing.prompt_layout import conditioning_rows

ATOL = 1e-4
CASES = ["t2i", "edit", "edit_textcfg"]
ROUTES = ["as-is", "onednn"]


def _case(manifest, name):
    return next(case for case in manifest["cases"] if case["name"] == name)


def _inputs(fixture_root, case):
    call = case["call"]
    prompts = call["caption"] if isinstance(call["caption"], list) else [call["caption"]]
    images = None
    if call["image"] is not None:
        images = [[Image.open(fixture_root / "goldens" / f"{name}.png").convert("RGB") for name in row]
                  for row in call["image"]]
    return prompts, images, call


def _golden_rows(case, prompts):
    """Map the official MLLM rows onto ours: the official t2i batch repeats the negative row."""
    if case["call"]["image"] is None:
        return [0] * len(prompts) + list(range(1, len(prompts) + 1))
    return list(range(3 * len(prompts)))


@pytest.fixture(scope="module", params=[(case, route) for case in CASES for route in ROUTES],
                ids=lambda param: "-".join(param))
def run(request, pipe, manifest, fixture_root):
    name, route = request.param
    case = _case(manifest, name)
    golden = load_file(fixture_root / "goldens" / case["file"])
    prompts, images, call = _inputs(fixture_root, case)
    onednn_products = []
    with pytest.MonkeyPatch.context() as patch:
        if route == "onednn":
            real = onednn_linear._onednn_linear
            patch.setattr(onednn_linear, "MIN_MULTIPLY_ADDS", 0)
            patch.setattr(onednn_linear, "_onednn_linear", lambda *args: onednn_products.append(1) or real(*args))
        pipe.clear_cache()  # the encode runs in this route, not served from the other's
        cond = pipe.encode(prompts, images=images, negative_prompt=call["negative_prompt"])
        steps = []
        params = SamplingParams(
            steps=call["num_inference_steps"],
            guidance_scale=call["guidance_scale"],
            image_guidance_scale=call["image_guidance_scale"],
            seed=case["seed"],
            num_images_per_prompt=call["num_images_per_prompt"],
        )
        latents = pipe.sample(cond, params=params, callback=steps.append)
        images_out = pipe.decode(latents)
    assert (len(onednn_products) > 100) == (route == "onednn")  # MLLM, connector, DiT and DC-AE products
    return dict(case=case, golden=golden, prompts=prompts, images=images, call=call,
                cond=cond, steps=steps, latents=latents, images_out=images_out)


def test_input_ids_and_mask(run, pipe):
    model, case, golden = pipe.model, run["case"], run["golden"]
    rows = conditioning_rows(model.prompts, run["prompts"], images_per_prompt(run["images"], len(run["prompts"])),
                             run["call"]["negative_prompt"])
    batch = model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
    index = _golden_rows(case, run["prompts"])
    if not case["image_cfg_branch"] and case["call"]["image"] is not None:
        # Without image guidance the official batch is [negative + images, prompt + images].
        batch_rows = list(range(len(run["prompts"]), 3 * len(run["prompts"])))
        index = list(range(2 * len(run["prompts"])))
    else:
        batch_rows = index
        index = list(range(len(index)))
    ours_ids = batch["input_ids"][batch_rows]
    ours_mask = batch["attention_mask"][batch_rows]
    golden_ids, golden_mask = golden["input_ids"][index], golden["attention_mask_full"][index]
    # The official batch may be padded further (it pads over its own rows); compare right-aligned.
    width = golden_ids.shape[1]
    assert ours_ids.shape[1] <= width
    assert torch.equal(ours_ids, golden_ids[:, width - ours_ids.shape[1]:])
    assert torch.equal(ours_mask, golden_mask[:, width - ours_ids.shape[1]:])
    assert bool((golden_mask[:, : width - ours_ids.shape[1]] == 0).all())
    if "image_grid_thw" in golden:
        grid = batch["image_grid_thw"]
        golden_grid = golden["image_grid_thw"]
        if not case["image_cfg_branch"]:
            grid = grid[len(run["prompts"]):]
        assert torch.equal(grid, golden_grid)
        pixels = batch["pixel_values"]
        if not case["image_cfg_branch"]:
            pixels = pixels[pixels.shape[0] // 3:]
        digest = hashlib.sha256(pixels.float().contiguous().numpy().tobytes()).hexdigest()
        assert digest == case["pixel_values"]["sha256_of_float32_bytes"]
        assert torch.allclose(pixels[:16], golden["pixel_values_first_patches"], atol=0, rtol=0)


def test_metaquery_states_and_connector(run, pipe):
    cond, golden, case = run["cond"], run["golden"], run["case"]
    rungs = cond.block_rungs()
    source = cond.sources[0]
    b = len(run["prompts"])
    if case["call"]["image"] is None:
        ours = torch.cat([source.negative.expand(-1, b, -1, -1), source.positive], dim=1)[rungs]
    elif case["image_cfg_branch"]:
        ours = torch.cat([source.negative, source.image_negative, source.positive], dim=1)[rungs]
    else:
        ours = torch.cat([source.image_negative, source.positive], dim=1)[rungs]
    torch.testing.assert_close(ours, golden["metaquery_hidden_states"], atol=ATOL, rtol=0)
    connector = pipe.model.dit.connector(ours)
    torch.testing.assert_close(connector, golden["connector_output"], atol=ATOL, rtol=0)


def test_every_denoising_step(run):
    golden, steps = run["golden"], run["steps"]
    assert len(steps) == run["call"]["num_inference_steps"]
    for info in steps:
        prefix = f"step{info.index:02d}."
        assert torch.equal(info.dit_timestep.cpu(), golden[prefix + "dit_timestep"])
        for ours, key in ((info.dit_input, "dit_input"), (info.dit_output, "dit_output"),
                          (info.guided, "guided_noise_pred"), (info.latents_before, "latents_before"),
                          (info.latents, "latents_after")):
            torch.testing.assert_close(ours.float().cpu(), golden[prefix + key], atol=ATOL, rtol=0,
                                       msg=lambda m, k=key, p=prefix: f"{p}{k}: {m}")
    torch.testing.assert_close(steps[0].latents_before.cpu(), golden["initial_latents"], atol=ATOL, rtol=0)


def test_final_latents_and_images(run, fixture_root):
    golden = run["golden"]
    torch.testing.assert_close(run["latents"].cpu(), golden["final_latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(run["images_out"].permute(0, 3, 1, 2), golden["output_images_float"],
                               atol=ATOL, rtol=0)
    ours_u8 = (run["images_out"] * 255).round().to(torch.uint8).numpy().astype(int)
    assert np.abs(ours_u8 - golden["output_images_uint8"].numpy().astype(int)).max() <= 1
    for index, png in enumerate(run["case"]["output_pngs"]):
        reference = np.asarray(Image.open(fixture_root / "goldens" / png).convert("RGB"), dtype=int)
        assert np.abs(ours_u8[index] - reference).max() <= 1


def test_scheduler_schedule(run, pipe):
    from tbac_core.pipeline.sampling import make_scheduler

    scheduler = make_scheduler("dpm++", pipe.model.scheduler_config)
    scheduler.set_timesteps(run["call"]["num_inference_steps"])
    assert torch.equal(scheduler.timesteps.cpu(), run["golden"]["scheduler_timesteps"])
    torch.testing.assert_close(scheduler.sigmas.float(), run["golden"]["scheduler_sigmas"], atol=1e-6, rtol=0)
