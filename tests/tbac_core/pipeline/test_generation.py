"""Generation beyond the golden cases: batches, pairing of guidance rows, samplers, img2img, errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core.errors import IncompatibleConditioningError, InvalidParameterError
from tbac_core.ladder.conditioning import ModelIdentity
from tbac_core.params import SamplingParams
from tbac_core.pipeline.sampling import denoise, initial_noise, make_schedule

STEPS = 3


def _image(seed: int, size=(64, 64)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _run(pipe, cond, noise, params):
    scheduler, timesteps = make_schedule(params, pipe.model.scheduler_config, pipe.model.dit.device)
    return denoise(pipe.model.dit, cond, noise, scheduler, timesteps, params)


@pytest.mark.parametrize("image_guidance", [1.0, 1.5])
def test_edit_batches_pair_rows_correctly(pipe, image_guidance):
    """Several prompts x several images per prompt equal each prompt sampled on its own.

    The official code crashes with several edit captions and mis-pairs guidance rows when
    num_images_per_prompt > 1; here every (prompt, image index) keeps its own rows.
    """
    prompts = ["make it blue", "add a hat"]
    inputs = [[_image(1)], [_image(2, (96, 64))]]
    repeats = 2
    params = SamplingParams(steps=STEPS, image_guidance_scale=image_guidance, num_images_per_prompt=repeats)
    batch_cond = pipe.encode(prompts, images=inputs)
    noise = initial_noise(5, (len(prompts) * repeats, 8, 8, 8))
    together = _run(pipe, batch_cond, noise, params)
    for index, (prompt, images) in enumerate(zip(prompts, inputs)):
        alone = _run(pipe, pipe.encode(prompt, images=[images]), noise[index * repeats:(index + 1) * repeats], params)
        torch.testing.assert_close(together[index * repeats:(index + 1) * repeats], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(together[0], together[1])  # different noise per image


def test_text_to_image_batches(pipe):
    params = SamplingParams(steps=STEPS, num_images_per_prompt=3)
    prompts = ["a red cat", "a blue house"]
    cond = pipe.encode(prompts, negative_prompt="blurry")
    noise = initial_noise(9, (6, 8, 8, 8))
    together = _run(pipe, cond, noise, params)
    alone = _run(pipe, pipe.encode(prompts[1], negative_prompt="blurry"), noise[3:], params)
    torch.testing.assert_close(together[3:], alone, atol=1e-4, rtol=0)


def test_negative_prompt_matters(pipe):
    params = SamplingParams(steps=STEPS, seed=3)
    plain = pipe.sample(pipe.encode("a red cat"), params=params)
    negative = pipe.sample(pipe.encode("a red cat", negative_prompt="dark, blurry"), params=params)
    assert not torch.allclose(plain, negative)


def test_multi_image_edit(pipe):
    params = SamplingParams(steps=STEPS, seed=4)
    one = pipe.sample(pipe.encode("combine them", images=[_image(1)]), params=params)
    two_cond = pipe.encode("combine them", images=[_image(1), _image(2)])
    assert two_cond.sources[0].num_input_images == (2,)
    two = pipe.sample(two_cond, params=params)
    assert two.shape == one.shape and not torch.allclose(one, two)


def test_seed_determinism_and_64_bit_seeds(pipe):
    cond = pipe.encode("a tree")
    for seed in (0, 2**63 + 12345, 2**64 - 1):
        params = SamplingParams(steps=2, seed=seed)
        torch.testing.assert_close(pipe.sample(cond, params=params), pipe.sample(cond, params=params), atol=0, rtol=0)
    with pytest.raises(InvalidParameterError, match="seed"):
        SamplingParams(seed=2**64).validate()
    with pytest.raises(InvalidParameterError, match="seed"):
        SamplingParams(seed=-1).validate()


def test_euler_sampler(pipe):
    cond = pipe.encode("a tree")
    euler = pipe.sample(cond, params=SamplingParams(steps=4, sampler="euler", seed=1))
    dpm = pipe.sample(cond, params=SamplingParams(steps=4, sampler="dpm++", seed=1))
    assert torch.isfinite(euler).all() and not torch.allclose(euler, dpm)


def test_non_square_sizes(pipe):
    out = pipe.generate("a wide landscape", width=96, height=48, steps=2)
    assert out.tensors.shape == (1, 48, 96, 3)
    assert out.images[0].size == (96, 48)


@pytest.mark.parametrize("width, height", [(65, 64), (64, 0), (64, -8), (100000, 64), (64.0, 64)])
def test_impossible_sizes_refused(pipe, width, height):
    with pytest.raises(InvalidParameterError, match="multiple of 8|integer"):
        pipe.generate("x", width=width, height=height, steps=1)


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -3), ("guidance_scale", float("nan")),
                                          ("image_guidance_scale", float("inf")), ("denoise", 0.0),
                                          ("sampler", "ddim"), ("num_images_per_prompt", 0)])
def test_bad_parameters_refused(field, value):
    with pytest.raises(InvalidParameterError, match=field.split("_")[0]):
        SamplingParams(**{field: value}).validate()


def test_absurd_batch_refused_before_allocating(pipe):
    cond = pipe.encode("x")
    with pytest.raises(InvalidParameterError, match="batch of 1000"):
        pipe.sample(cond, params=SamplingParams(steps=1, num_images_per_prompt=1000))


def test_incompatible_conditioning_refused(pipe):
    cond = pipe.encode("x")
    other = ModelIdentity("other", "0" * 64, 64, 7, 8, 4)
    foreign = type(cond)(cond.sources, cond.blocks, other)
    with pytest.raises(IncompatibleConditioningError, match="made by model 'other'"):
        pipe.sample(foreign, params=SamplingParams(steps=1))


def test_image_to_image(pipe):
    source = pipe.generate("a red cat", steps=STEPS, seed=2)
    latents = pipe.encode_image(source.images[0])
    assert latents.shape == (1, 8, 8, 8)
    weak = pipe.generate("a red cat", steps=10, seed=3, init_image=source.images[0], denoise=0.1)
    strong = pipe.generate("a red cat", steps=10, seed=3, init_image=source.images[0], denoise=0.9)
    reference = pipe.decode(latents)
    weak_distance = (weak.tensors - reference).abs().mean()
    strong_distance = (strong.tensors - reference).abs().mean()
    assert weak_distance < strong_distance
    with pytest.raises(InvalidParameterError, match="leaves no step"):
        pipe.generate("x", steps=2, init_image=source.images[0], denoise=0.1)


def test_cancellation_stops_within_a_step_and_model_stays_usable(pipe):
    class Cancelled(BaseException):
        pass

    seen = []

    def check_cancel():
        if len(seen) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.sample(pipe.encode("x"), params=SamplingParams(steps=8), callback=seen.append, check_cancel=check_cancel)
    assert len(seen) == 2
    assert torch.isfinite(pipe.generate("x", steps=2).latents).all()
