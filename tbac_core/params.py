"""Every parameter object of the library, with its defaults, its limits and its one check.

Nodes, the command line and the pipeline take their defaults and limits from here, so a default
is written once. ``validate()`` is the only check of a parameter object; the pipeline calls it
once, at the top of a job, before anything is loaded or allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidParameterError

# -- sampling --------------------------------------------------------------------------------------
SAMPLERS = ("dpm++", "euler")  # dpm++: the official flow DPM-Solver++; euler: flow-matching Euler
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
MAX_SIDE = 4096  # pixels, per side
MAX_BATCH = 64  # images per DiT call (prompts x num_images_per_prompt)
DEFAULT_IMAGE_SIZE = 512  # TBAC-UniImage-3B's trained size; a checkpoint's config may say otherwise
SIZE_STEP = 32  # TBAC-UniImage-3B's latent factor; every model's factor divides it
MAX_GUIDANCE_UI = 30.0  # upper end of the guidance sliders (the library takes any finite value)
MAX_CACHE_THRESHOLD = 1.0  # First-Block-Cache relative L1 change; above ~0.3 every step the limit allows is skipped
MAX_CACHE_SKIPS = 10  # First-Block-Cache: most steps in a row estimated without running blocks 1..

# -- memory and precision ----------------------------------------------------------------------------
MEMORY_MODES = ("full", "offload-mllm", "sequential")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Stored weight formats of tbac_core.quantization: fp8 e4m3 (safetensors) and GGUF block types.
QUANTIZATION_FORMATS = ("fp8", "q8_0", "q5_k", "q4_k")

# -- understanding ---------------------------------------------------------------------------------
MAX_NEW_TOKENS = 8192

# -- inputs of one encode or question ----------------------------------------------------------------
# The MLLM's memory grows about quadratically with the images of one conversation (every image adds
# its visual tokens to the sequence): on the tiny test model 8 images of one prompt cost +248 MB,
# 16 +583 MB, 32 +1656 MB (peak RSS of one TBACPipeline.encode_prompt, 64x64 images, CPU float32).
MAX_INPUT_IMAGES = 8  # input images per prompt (edit) or per question (understanding)
VISION_TOKEN_PIXELS = 28 * 28  # pixels of one merged Qwen2.5-VL visual token
MAX_VISION_TOKENS = 4 * 1280  # visual tokens of all images of one conversation (4 images at 1280 each)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    steps: int = 30
    guidance_scale: float = 4.5
    image_guidance_scale: float = 1.5
    sampler: str = "dpm++"
    seed: int = 0
    num_images_per_prompt: int = 1
    denoise: float = 1.0  # < 1 with init latents: image-to-image
    # Opt-in accelerations (approximate; the defaults are off and give the exact result).
    cache_threshold: float = 0.0  # First-Block-Cache: skip blocks 1.. below this change of block 0; 0 = off
    cache_max_skips: int = 2  # with the cache on: at most this many steps in a row skip blocks 1..
    guidance_cutoff: float = 1.0  # fraction of steps with every guidance branch, then positive only; 1 = off

    def validate(self, img2img: bool = False) -> None:
        """Refuse any field out of range; ``img2img``: ``denoise`` must also leave a step to run."""
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidParameterError(f"steps must be an integer in 1..{MAX_STEPS}, got {self.steps!r}.")
        for name in ("guidance_scale", "image_guidance_scale", "denoise", "cache_threshold", "guidance_cutoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidParameterError(f"{name} must be a finite number, got {value!r}.")
        if not 0.0 < self.denoise <= 1.0:
            raise InvalidParameterError(f"denoise must be in (0, 1], got {self.denoise}.")
        if not 0.0 <= self.cache_threshold <= MAX_CACHE_THRESHOLD:
            raise InvalidParameterError(
                f"cache_threshold must be in 0..{MAX_CACHE_THRESHOLD} (0 = off, e.g. 0.1-0.2 for a "
                f"speed-up), got {self.cache_threshold}."
            )
        if not _is_int(self.cache_max_skips) or not 1 <= self.cache_max_skips <= MAX_CACHE_SKIPS:
            raise InvalidParameterError(
                f"cache_max_skips must be an integer in 1..{MAX_CACHE_SKIPS} (steps in a row that step caching may "
                f"skip before a full step; default {SamplingParams.cache_max_skips}), got {self.cache_max_skips!r}."
            )
        if not 0.0 <= self.guidance_cutoff <= 1.0:
            raise InvalidParameterError(
                f"guidance_cutoff must be a fraction of the steps in 0..1 (1 = guidance on every step), "
                f"got {self.guidance_cutoff}."
            )
        if self.sampler not in SAMPLERS:
            raise InvalidParameterError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidParameterError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}.")
        if not _is_int(self.num_images_per_prompt) or self.num_images_per_prompt < 1:
            raise InvalidParameterError(
                f"num_images_per_prompt must be a positive integer, got {self.num_images_per_prompt!r}."
            )
        if img2img and self.first_step() >= self.steps:
            raise InvalidParameterError(
                f"denoise={self.denoise} with {self.steps} steps leaves no step to run; raise denoise or steps."
            )

    def first_step(self) -> int:
        """Index of the first scheduler step that runs: image-to-image skips the noisiest ones."""
        return self.steps - int(round(self.steps * self.denoise))


def check_size(width: int, height: int, factor: int) -> None:
    """Refuse sizes the DiT cannot take before anything is allocated."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParameterError(f"{name} must be an integer, got {value!r}.")
        if not factor <= value <= MAX_SIDE or value % factor:
            raise InvalidParameterError(
                f"{name}={value} is not allowed: use a multiple of {factor} (the VAE's latent factor) "
                f"between {factor} and {MAX_SIDE}."
            )


def check_batch(count: int) -> None:
    if not 1 <= count <= MAX_BATCH:
        raise InvalidParameterError(f"A batch of {count} images is not allowed: use 1..{MAX_BATCH}.")


def check_prompt_count(count: int) -> None:
    """Refuse a job of more prompts than one DiT call may hold, before any of them is encoded."""
    if not 1 <= count <= MAX_BATCH:
        raise InvalidParameterError(
            f"A batch of {count} prompts is not allowed: use 1..{MAX_BATCH} (one prompt per line makes one "
            f"prompt of every non-blank line); split the list over several jobs."
        )


def check_text(value, name: str) -> str:
    """Refuse text that is not a ``str`` or cannot be written as UTF-8 (a lone surrogate such as ``\\ud800``)."""
    if not isinstance(value, str):
        raise InvalidParameterError(f"{name} must be text (a string), got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            f"{name} holds the character {value[exc.start]!r} at position {exc.start}, which is not valid "
            f"Unicode text (a lone UTF-16 surrogate); remove it or retype the text."
        ) from None
    return value


def check_image_count(count: int, what: str = "input images of one prompt") -> None:
    """Refuse too many input images before any of them is converted or shown to the MLLM."""
    if count > MAX_INPUT_IMAGES:
        raise InvalidParameterError(
            f"{count} {what} are too many: at most {MAX_INPUT_IMAGES} are allowed (the MLLM's memory grows about "
            f"quadratically with the images of one conversation). An IMAGE batch counts every frame as one input "
            f"image: pick the frames you need first (e.g. every n-th frame of a video, or one of the batch)."
        )


def check_latents(latents, channels: int, what: str = "latents") -> None:
    """Refuse latents the DC-AE cannot decode: not a float tensor [B, C, h, w] with B in 1..MAX_BATCH, or NaN/inf."""
    import torch  # here, so that reading the limits never needs torch

    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InvalidParameterError(
            f"{what} must be a float tensor [B, {channels}, h, w] (TBAC latents from 'TBAC Sampler' or 'TBAC Encode "
            f"Image'), got {shape}."
        )
    batch, got_channels, height, width = latents.shape
    if got_channels != channels or 0 in (height, width):
        raise InvalidParameterError(
            f"{what} of shape {tuple(latents.shape)} do not fit this model's DC-AE, which takes [B, {channels}, h, w] "
            f"with h, w >= 1; they come from another model or VAE."
        )
    if not 1 <= batch <= MAX_BATCH:
        raise InvalidParameterError(f"{what} hold {batch} images; 1..{MAX_BATCH} are allowed (an empty batch has "
                                    f"nothing to decode).")
    if not torch.isfinite(latents).all():
        raise InvalidParameterError(f"{what} contain NaN or infinite values; the image would be black or garbage.")


def check_vision_budget(num_images: int, pixels_per_image: int) -> None:
    """Refuse conversations whose images together exceed ``MAX_VISION_TOKENS`` visual tokens."""
    check_image_count(num_images)
    tokens = num_images * (int(pixels_per_image) // VISION_TOKEN_PIXELS)
    if tokens > MAX_VISION_TOKENS:
        raise InvalidParameterError(
            f"{num_images} images of {pixels_per_image} pixels each make {tokens} visual tokens; one conversation "
            f"may hold {MAX_VISION_TOKENS} ({MAX_VISION_TOKENS * VISION_TOKEN_PIXELS} pixels in all). Use fewer "
            f"images or a lower pixel setting (max_pixels / the processor's min_pixels)."
        )


@dataclass(frozen=True)
class GenerationSettings:
    """How the answer is decoded. Sampling fields are used only when ``do_sample``."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50  # 0 disables top-k
    repetition_penalty: float = 1.05  # Qwen2.5-VL's released setting; 1.0 disables it
    seed: int = 0

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidParameterError(
                f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens!r}."
            )
        if not isinstance(self.do_sample, bool):
            raise InvalidParameterError(f"do_sample must be True or False, got {self.do_sample!r}.")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise InvalidParameterError(
                f"temperature must be a number above 0 (lower = more deterministic), got {self.temperature!r}; "
                f"for deterministic answers use do_sample=False instead of temperature 0."
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}.")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}.")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidParameterError(
                f"repetition_penalty must be a number above 0 (1.0 disables it), got {self.repetition_penalty!r}."
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidParameterError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}.")
