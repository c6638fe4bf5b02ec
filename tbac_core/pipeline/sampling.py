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
from ..modeling.step_cache import FirstBlockCache
from ..params import SAMPLERS, SamplingParams
from .masking import InpaintBlend


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


def guided_step_count(total: int, guidance_cutoff: float) -> int:
    """How many of the ``total`` steps evaluate every guidance branch (the rest: positive only)."""
    return int(round(total * guidance_cutoff))


def make_schedule(params: SamplingParams, scheduler_config: dict, device, img2img: bool = False):
    """A fresh scheduler with its timesteps set -> (scheduler, the timesteps to run).

    Image-to-image (``img2img`` with ``params.denoise < 1``) starts at ``params.first_step()``.
    """
    scheduler = make_scheduler(params.sampler, scheduler_config)
    scheduler.set_timesteps(params.steps, device=device)
    timesteps = scheduler.timesteps
    if img2img and params.denoise < 1.0:
        start = params.first_step()
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
    return scheduler, timesteps


@torch.no_grad()
def denoise(
    dit: LadderDiT,
    cond: LadderConditioning,
    latents: torch.Tensor,  # [B * images_per_prompt, C, h, w] float32, from the pipeline's prepare_latents
    scheduler,
    timesteps: torch.Tensor,
    params: SamplingParams,
    callback: StepCallback | None = None,
    check_cancel: Callable[[], None] | None = None,
    inpaint: InpaintBlend | None = None,
) -> torch.Tensor:
    """The denoising loop -> final latents [B * images_per_prompt, C, h, w] (float32).

    Inputs are trusted (the pipeline's ``check_inputs`` validated them). With ``inpaint`` only the
    masked region is denoised (the rest follows the noised input latents and ends equal to them).
    """
    device = dit.device
    branches = guidance_branches(cond, params.image_guidance_scale)
    repeats = params.num_images_per_prompt

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
    # Also step-invariant: each block's cross-attention keys/values of its condition.
    all_branches_kv = dit.precompute_conditions(block_conditions, mask_bias)
    # Guidance truncation: after the cutoff only the positive branch (the last rows) runs.
    positive_rows = slice(rows - rows // len(branches), rows)
    guided_steps = guided_step_count(len(timesteps), params.guidance_cutoff)
    positive_kv = [kv.select_rows(positive_rows) for kv in all_branches_kv]
    step_cache = (FirstBlockCache(params.cache_threshold, params.cache_max_skips)
                  if params.cache_threshold > 0 else None)

    latents = latents.to(device=device, dtype=torch.float32)
    if inpaint is not None:
        inpaint = inpaint.to(device)
        first = len(scheduler.sigmas) - 1 - len(timesteps)  # index of the first sigma that runs
    timesteps_on_device = timesteps.to(device)
    for index, t in enumerate(timesteps_on_device):
        if check_cancel is not None:
            check_cancel()
        if inpaint is not None:
            latents = inpaint.before_step(latents, scheduler.sigmas[first + index].to(device=device))
        if index == guided_steps and step_cache is not None:
            step_cache.keep_rows(positive_rows)  # the positive rows' residuals stay valid references
        step_branches = branches if index < guided_steps else branches[-1:]
        conditions = all_branches_kv if index < guided_steps else positive_kv
        model_input = torch.cat([latents] * len(step_branches)).to(dit.dtype)
        timestep = t.expand(model_input.shape[0])
        prediction = dit(model_input, timestep, conditions, step_cache=step_cache).float()
        guided = combine_guidance(prediction, step_branches, params) if len(step_branches) > 1 else prediction
        previous = latents
        latents = scheduler.step(guided, t, latents).prev_sample
        if callback is not None:
            callback(StepInfo(index, len(timesteps), t, latents, previous, model_input, timestep, prediction, guided))
    if inpaint is not None:
        latents = inpaint.finish(latents)
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "Sampling produced NaN/inf latents, so the image would be black or garbage. Lower the "
            "guidance scales, or run the model in float32/bfloat16 instead of float16."
        )
    return latents
