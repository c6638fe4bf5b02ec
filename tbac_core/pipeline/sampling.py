"""Denoising: schedulers, classifier-free guidance over the ladder DiT, progress and cancellation.

The default sampler is what the official pipeline runs: diffusers' ``DPMSolverMultistepScheduler``
with SANA's flow sigmas (flow_shift 3.0), whose integer timesteps go straight into the DiT. The
alternative is flow-matching Euler (``FlowMatchEulerDiscreteScheduler``, same shift).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from ..errors import InvalidParameterError, NonFiniteOutputError
from ..ladder.conditioning import LadderConditioning
from ..modeling.dit import LadderDiT, mask_to_bias
from ..params import SAMPLERS, SamplingParams
from .masking import blend_unmasked, resize_mask


@dataclass(frozen=True)
class StepInfo:
    """What a step callback sees: progress, and the step's tensors (for previews and tests)."""

    index: int  # 0-based step just finished
    total: int
    timestep: torch.Tensor
    latents: torch.Tensor  # after the step [B * images_per_prompt, C, h, w]
    latents_before: torch.Tensor
    dit_input: torch.Tensor  # every guidance branch stacked [branches * B * images_per_prompt, ...]
    dit_timestep: torch.Tensor
    dit_output: torch.Tensor
    guided: torch.Tensor


StepCallback = Callable[[StepInfo], None]


def make_scheduler(sampler: str, scheduler_config: dict):
    """A fresh scheduler per generation: schedulers keep per-run state (step index, history)."""
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config)
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
            shift=scheduler_config.get("flow_shift", 3.0),
        )
    raise InvalidParameterError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 Gaussian noise from a CPU generator, as the official pipeline draws it.

    Drawing on the CPU makes the same seed give the same image on every device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def guidance_branches(cond: LadderConditioning, image_guidance_scale: float) -> tuple[str, ...]:
    """Which conditioning branches one DiT call evaluates, in batch order.

    Editing with ``image_guidance_scale > 1`` uses 3-way guidance: unconditional (negative prompt,
    black images), image-only (negative prompt, real images), full (prompt, real images). Editing
    without it compares the prompt with the negative prompt, both seeing the real images.
    """
    if cond.sources[0].image_negative is None:
        return ("negative", "positive")
    if image_guidance_scale > 1.0:
        return ("negative", "image_negative", "positive")
    return ("image_negative", "positive")


def combine_guidance(predictions: torch.Tensor, branches: tuple[str, ...], params: SamplingParams) -> torch.Tensor:
    chunks = predictions.chunk(len(branches))
    g = params.guidance_scale
    if len(branches) == 3:
        uncond, image_only, full = chunks
        return uncond + params.image_guidance_scale * (image_only - uncond) + g * (full - image_only)
    uncond, full = chunks
    return uncond + g * (full - uncond)


@torch.no_grad()
def denoise(
    dit: LadderDiT,
    cond: LadderConditioning,
    noise: torch.Tensor,  # [B * images_per_prompt, C, h, w] float32
    scheduler_config: dict,
    params: SamplingParams,
    init_latents: torch.Tensor | None = None,  # [B * images_per_prompt, C, h, w] for image-to-image
    callback: StepCallback | None = None,
    check_cancel: Callable[[], None] | None = None,
    noise_mask: torch.Tensor | None = None,  # [B * images_per_prompt or 1, 1, h', w'], 1 = may change
) -> torch.Tensor:
    """Run the sampler and return final latents [B * images_per_prompt, C, h, w] (float32).

    With ``noise_mask`` (needs ``init_latents``) only the masked region is denoised: before every
    DiT call the unmasked region is reset to ``init_latents`` noised to the step's sigma, and the
    result holds ``init_latents`` exactly there (ComfyUI's inpainting convention).
    """
    params.validate()
    device = dit.device
    branches = guidance_branches(cond, params.image_guidance_scale)
    repeats = params.num_images_per_prompt
    batch = cond.batch_size

    # Step-invariant work, once per generation: connector + caption projection for every block.
    per_branch = [cond.block_conditions(name, dit.embed_condition) for name in branches]
    block_conditions = [
        torch.cat([conds[i].repeat_interleave(repeats, dim=0) for conds in per_branch], dim=0)
        for i in range(dit.num_blocks)
    ]  # num_blocks x [branches * B * repeats, N, D]
    rows = block_conditions[0].shape[0]
    if cond.attention_mask is not None:
        mask = cond.attention_mask.repeat_interleave(repeats, dim=0).repeat(len(branches), 1)
    else:
        mask = torch.ones(rows, block_conditions[0].shape[1], dtype=torch.long)
    mask_bias = mask_to_bias(mask.to(device), dit.dtype)

    scheduler = make_scheduler(params.sampler, scheduler_config)
    scheduler.set_timesteps(params.steps, device=device)
    timesteps = scheduler.timesteps
    latents = noise.to(device=device, dtype=torch.float32)
    start = 0
    if init_latents is not None and params.denoise < 1.0:
        start = params.steps - int(round(params.steps * params.denoise))
        if start >= params.steps:
            raise InvalidParameterError(
                f"denoise={params.denoise} with {params.steps} steps leaves no step to run; raise denoise or steps."
            )
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        sigma = scheduler.sigmas[start].to(device=device, dtype=torch.float32)
        latents = (1.0 - sigma) * init_latents.to(device=device, dtype=torch.float32) + sigma * latents
    if latents.shape[0] != batch * repeats:
        raise InvalidParameterError(
            f"Noise has batch {latents.shape[0]} but the conditioning needs {batch} x {repeats} images."
        )
    if noise_mask is not None:
        if init_latents is None:
            raise InvalidParameterError(
                "A noise mask needs the latents of the image to inpaint: connect a latent (e.g. from "
                "'TBAC Encode Image') to the sampler."
            )
        noise_mask = resize_mask(noise_mask, latents.shape[0], *latents.shape[-2:]).to(device)
        init = init_latents.to(device=device, dtype=torch.float32)
        step_noise = noise.to(device=device, dtype=torch.float32)

    for index, t in enumerate(timesteps):
        if check_cancel is not None:
            check_cancel()
        if noise_mask is not None:
            sigma = scheduler.sigmas[start + index].to(device=device, dtype=torch.float32)
            latents = blend_unmasked(latents, (1.0 - sigma) * init + sigma * step_noise, noise_mask)
        model_input = torch.cat([latents] * len(branches)).to(dit.dtype)
        timestep = t.expand(model_input.shape[0]).to(device)
        prediction = dit(model_input, timestep, block_conditions, mask_bias).float()
        guided = combine_guidance(prediction, branches, params)
        previous = latents
        latents = scheduler.step(guided, t, latents).prev_sample
        if callback is not None:
            callback(StepInfo(index, len(timesteps), t, latents, previous, model_input, timestep, prediction, guided))
    if noise_mask is not None:
        latents = blend_unmasked(latents, init, noise_mask)
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "Sampling produced NaN/inf latents, so the image would be black or garbage. Lower the "
            "guidance scales, or run the model in float32/bfloat16 instead of float16."
        )
    return latents
