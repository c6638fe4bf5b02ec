"""``TBACPipeline``: text-to-image, editing and image-to-image in a few calls, for scripts.

    from tbac_core import TBACPipeline
    pipe = TBACPipeline.from_pretrained("models/tbac/TBAC-UniImage-3B")
    images = pipe.generate("a red cat on a blue chair", seed=42).images   # list of PIL images
    edited = pipe.edit("make the cat green", images=[images[0]], seed=1).images

A job runs like a diffusers pipeline: ``check_inputs`` validates everything once, before any
work, then ``encode_prompt`` (MLLM), ``prepare_latents`` (seeded noise, image-to-image noising),
the denoising loop (``sampling.denoise``) and ``decode`` (DC-AE). The stages trust
``check_inputs``; the public building blocks a caller may use alone (``encode_prompt``,
``sample``, ``encode_image``) check their own inputs through it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from PIL import Image

from ..devices import resolve_device
from ..errors import InvalidParameterError, NonFiniteOutputError
from ..ladder.conditioning import LadderConditioning
from ..loading.build import load_model
from ..loading.weight_checks import check_model_weights_finite
from ..modeling.model import TBACModel
from ..modeling.vae import decode_latents, encode_images
from ..params import (
    SamplingParams,
    check_batch,
    check_latents,
    check_prompt_count,
    check_size,
    check_text,
)
from ..processing.images import image_batch, image_fingerprint, images_per_prompt, images_to_uint8
from .batch_memory import check_denoise_memory
from .compile import compile_dit_blocks
from .masking import InpaintBlend, inpaint_blend
from .placement import MemoryModePlacement, Placement
from .sampling import (
    StepCallback,
    denoise,
    guidance_branches,
    initial_noise,
    make_schedule,
)

TILED_DECODE_ABOVE = 1024 * 1024  # pixels per image; DC-AE decodes larger images tile by tile
DEFAULTS = SamplingParams()

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    tensors: torch.Tensor  # [B, H, W, 3] float in 0..1, CPU
    latents: torch.Tensor  # [B, C, h, w] float32


@dataclass(frozen=True)
class CheckedInputs:
    """A job's inputs after ``check_inputs``: normalised, validated, ready for the stages."""

    prompts: list[str]
    images: list[list[Image.Image]] | None  # one list of PIL RGB images per prompt (editing)
    negative_prompt: str
    block_rungs: list[int]  # one MLLM rung per DiT block
    layers: str  # the layer spec as given (a label carried by the conditioning)
    width: int | None  # None: not a sampling job (encode only)
    height: int | None


class TBACPipeline:
    """Runs a ``TBACModel``: encode, sample, decode, with a placement and a conditioning cache.

    ``placement``: where each part runs (see ``tbac_core.pipeline.placement``); by default the
    library's ``memory`` mode ``full`` / ``offload-mllm`` / ``sequential`` on ``device``.
    ``cache_size``: how many recent conditionings are kept, so re-running an unchanged prompt
    does not run the MLLM again (0 disables; bounded so long queues keep memory flat).
    ``guidance_cache_size``: how many recent guidance groups (negative prompt with its images) keep
    their MLLM states, and twice as many recent images their vision features, so a new prompt with
    the same negative prompt and input images runs only its own rows through the MLLM and no image
    through the vision tower again (0 disables). All of it waits in CPU memory between encodes
    (``devices.to_host``): a row is 64 x hidden per rung, ~10 MB for TBAC-UniImage-3B in bf16; an
    input image's features ~1 MB (256 tokens); a group's head keys/values (``modeling.prefix_kv``)
    ~1.2 MB for a text row, ~12 MB more per input image.
    Thread safety: MLLM runs on one model are serialised (``model.mllm_lock``).
    """

    def __init__(self, model: TBACModel, *, memory: str = "full", device=None, cache_size: int = 8,
                 guidance_cache_size: int = 4, compile_dit: bool = False, placement: Placement | None = None):
        self.model = model
        if placement is None:
            placement = MemoryModePlacement(model, resolve_device(device) if device else model.device, memory)
        self.placement = placement
        self._cache: RecentCache = RecentCache(cache_size)  # request -> LadderConditioning
        # Guidance rows (negative prompt + images) -> their MLLM states: a new prompt with the same
        # negative prompt and images runs only its own rows through the MLLM.
        self._guidance_rows: RecentCache = RecentCache(guidance_cache_size)
        self._seen_images: list = []  # (patches, vision features) of recent input images, least recently used first
        # compile_dit: whether the DiT blocks were compiled (False when asked but no compiler is found).
        compute_device = getattr(placement, "device", None) or model.device  # where the DiT will run
        self.compiled_dit = compile_dit and compile_dit_blocks(model.dit, torch.device(compute_device))

    @classmethod
    def from_pretrained(cls, checkpoint_dir, *, memory: str = "full", device=None, cache_size: int = 8,
                        guidance_cache_size: int = 4, compile_dit: bool = False, **load_kwargs) -> "TBACPipeline":
        """Load a checkpoint (``load_model``'s arguments); outside ``full`` mode parts are read to the CPU."""
        device = resolve_device(device)
        load_device = device if memory == "full" else torch.device("cpu")
        model = load_model(checkpoint_dir, device=load_device, **load_kwargs)
        return cls(model, memory=memory, device=device, cache_size=cache_size,
                   guidance_cache_size=guidance_cache_size, compile_dit=compile_dit)

    @property
    def cache_size(self) -> int:
        """How many recent conditionings are kept (the constructor's ``cache_size``)."""
        return self._cache.size

    @property
    def vae_scale_factor(self) -> int:
        return self.model.vae_scale_factor

    # -- 1. checking -------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        images=None,
        negative_prompt: str = "",
        *,
        layers="default",
        params: SamplingParams | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: torch.Tensor | None = None,
    ) -> CheckedInputs:
        """Validate and normalise every input of a job before any work is done.

        Prompts must be text; images are normalised to PIL RGB (``processing.images``); the layer
        spec is parsed; with ``params`` (a sampling job) the parameters, the size (the model's
        trained size when not given; ``init_image``'s [B, H, W, 3] size for image-to-image) and the
        batch (prompts x ``num_images_per_prompt``) are checked too.
        """
        prompts = _prompt_list(prompt)
        if not isinstance(negative_prompt, str):
            raise InvalidParameterError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}.")
        check_text(negative_prompt, "negative_prompt")
        block_rungs = self.model.block_rungs(layers)
        if params is not None:
            if not isinstance(params, SamplingParams):
                raise InvalidParameterError(f"params must be a SamplingParams, got {type(params).__name__}.")
            params.validate(img2img=init_image is not None)
            if init_image is not None:
                height, width = init_image.shape[1:3]
            width, height = self.resolve_size(width, height)
            check_batch(len(prompts) * params.num_images_per_prompt)
        per_prompt_images = images_per_prompt(images, len(prompts))
        return CheckedInputs(prompts, per_prompt_images, negative_prompt, block_rungs, str(layers), width, height)

    def resolve_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Fill in the model's trained size and refuse impossible ones, before any work is done."""
        size = self.model.config.default_image_size
        width = size if width is None else width
        height = size if height is None else height
        check_size(width, height, self.vae_scale_factor)
        return width, height

    # -- 2. encoding ---------------------------------------------------------------------------
    def encode_prompt(self, prompt, images=None, negative_prompt: str = "", layers="default",
                      keep_all_rungs: bool = False,
                      check_cancel: Callable[[], None] | None = None) -> LadderConditioning:
        """Prompts (and input images for editing) -> ``LadderConditioning``, reusing recent results.

        ``images``: None, one image or a flat list (shared by every prompt), or one list per prompt.
        """
        inputs = self.check_inputs(prompt, images, negative_prompt, layers=layers)
        return self._encode(inputs, keep_all_rungs, check_cancel)

    encode = encode_prompt  # the name the ComfyUI nodes call

    def _encode(self, inputs: CheckedInputs, keep_all_rungs: bool = False,
                check_cancel: Callable[[], None] | None = None) -> LadderConditioning:
        key = (tuple(inputs.prompts), _images_key(inputs.images), inputs.negative_prompt,
               tuple(inputs.block_rungs), inputs.layers, keep_all_rungs)
        if key in self._cache:
            return self._cache[key]
        with self.model.mllm_lock, self.placement.use("mllm"):
            cond = self.model.encode(inputs.prompts, images=inputs.images, negative_prompt=inputs.negative_prompt,
                                     layers=inputs.layers, block_rungs=inputs.block_rungs,
                                     keep_all_rungs=keep_all_rungs, check_cancel=check_cancel,
                                     guidance_row_cache=self._guidance_rows, seen_images=self._seen_images)
        # The images of the last few encodes (an edit shows its input and a black image) stay known;
        # the list is least recently used first, so a black image shared by same-size edits stays.
        del self._seen_images[:max(0, len(self._seen_images) - 2 * self._guidance_rows.size)]
        self._cache[key] = cond
        return cond

    def clear_cache(self) -> None:
        self._cache.clear()
        self._guidance_rows.clear()
        self._seen_images.clear()

    def encode_image(self, images) -> torch.Tensor:
        """Images (PIL, arrays, or [B, H, W, 3] float tensor in 0..1) -> latents, for image-to-image."""
        pixels = image_batch(images)  # [B, H, W, 3]
        check_size(pixels.shape[2], pixels.shape[1], self.vae_scale_factor)
        return self._encode_pixels(pixels)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.placement.use("vae") as vae:
            return encode_images(vae, pixels)  # [B, C, H/f, W/f]

    # -- 3. latents and the denoising loop -------------------------------------------------------
    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
        factor = self.vae_scale_factor
        return (batch, self.model.latent_channels, height // factor, width // factor)

    def initial_noise(self, batch: int, width: int, height: int, params: SamplingParams,
                      prompt_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """The seeded noise [batch, C, h, w] float32 (CPU) of a job: from ``params.seed`` for the whole
        batch, or with ``prompt_seeds`` one seed per prompt, each prompt's images getting exactly the
        noise a job of that prompt alone would get (batches of independent jobs)."""
        if prompt_seeds is None:
            return initial_noise(params.seed, self.latent_shape(batch, width, height))
        per_prompt = self.latent_shape(batch // len(prompt_seeds), width, height)
        return torch.cat([initial_noise(seed, per_prompt) for seed in prompt_seeds])

    def prepare_latents(self, batch: int, width: int, height: int, params: SamplingParams, scheduler,
                        init_latents: torch.Tensor | None = None, device=None,
                        prompt_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Seeded starting latents [batch, C, h, w] float32 on ``device``.

        Noise is drawn on the CPU (the same seed gives the same image on every device); see
        ``initial_noise`` for ``prompt_seeds``. With ``init_latents`` ([1 or batch, C, h, w]) and
        ``params.denoise < 1`` it is image-to-image: the init latents are noised to the sigma of the
        first step that runs.
        """
        noise = self.initial_noise(batch, width, height, params, prompt_seeds)
        latents = noise.to(device=device, dtype=torch.float32)
        if init_latents is None or params.denoise >= 1.0:
            return latents
        sigma = scheduler.sigmas[params.first_step()].to(device=device, dtype=torch.float32)
        init = init_latents.to(device=device, dtype=torch.float32).expand(batch, -1, -1, -1)
        return (1.0 - sigma) * init + sigma * latents

    def sample(
        self,
        cond: LadderConditioning,
        *,
        width: int | None = None,
        height: int | None = None,
        params: SamplingParams = DEFAULTS,
        init_latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
        noise_mask: torch.Tensor | None = None,
        prompt_seeds: Sequence[int] | None = None,
        check_memory: bool = False,
    ) -> torch.Tensor:
        """Denoise from seeded noise (or from ``init_latents`` [1 or B, C, h, w] with ``params.denoise < 1``).

        ``noise_mask`` (with ``init_latents``; any ``masking`` layout): only where it is 1 may the image
        change (inpainting, masked edits). ``prompt_seeds``: one seed per prompt of ``cond`` instead of
        ``params.seed`` (independent jobs denoised as one batch, each as it would be alone).
        ``check_memory``: refuse, before any step, a batch whose DiT activations would not fit into
        the device's free memory (``batch_memory``).
        """
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be a SamplingParams, got {type(params).__name__}.")
        params.validate(img2img=init_latents is not None)
        cond.check_model(self.model.identity)
        if init_latents is not None:
            height, width = (d * self.vae_scale_factor for d in init_latents.shape[-2:])
        width, height = self.resolve_size(width, height)
        batch = cond.batch_size * params.num_images_per_prompt
        check_batch(batch)
        _check_prompt_seeds(prompt_seeds, cond.batch_size, params)
        if init_latents is not None and init_latents.shape[0] not in (1, batch):
            raise InvalidParameterError(f"init latents have batch {init_latents.shape[0]}; expected 1 or {batch}.")
        inpaint = None
        if noise_mask is not None:
            inpaint = inpaint_blend(noise_mask, init_latents, self.initial_noise(batch, width, height, params,
                                                                                 prompt_seeds),
                                    factor=self.vae_scale_factor)
        return self.run_sampler(cond, width, height, params, init_latents, callback, check_cancel, inpaint,
                                prompt_seeds=prompt_seeds, check_memory=check_memory)

    def run_sampler(self, cond: LadderConditioning, width: int, height: int, params: SamplingParams,
                    init_latents: torch.Tensor | None = None, callback: StepCallback | None = None,
                    check_cancel: Callable[[], None] | None = None,
                    inpaint: InpaintBlend | None = None, *, prompt_seeds: Sequence[int] | None = None,
                    check_memory: bool = False) -> torch.Tensor:
        """The sampling stage on checked inputs (``check_inputs``/``sample`` validated them): the DiT
        is placed, the schedule set, latents prepared and denoised -> [B * images_per_prompt, C, h, w]."""
        with self.placement.use("dit") as dit:
            batch = cond.batch_size * params.num_images_per_prompt
            if check_memory:
                rows = batch * len(guidance_branches(cond, params.image_guidance_scale))
                factor = self.vae_scale_factor
                check_denoise_memory(dit, rows, height // factor, width // factor,
                                     f"Denoising {cond.batch_size} prompt(s) x {params.num_images_per_prompt} image(s)")
            scheduler, timesteps = make_schedule(params, self.model.scheduler_config, dit.device,
                                                 img2img=init_latents is not None)
            latents = self.prepare_latents(batch, width, height, params, scheduler, init_latents, dit.device,
                                           prompt_seeds)
            try:
                return denoise(dit, cond, latents, scheduler, timesteps, params,
                               callback=callback, check_cancel=check_cancel, inpaint=inpaint)
            except NonFiniteOutputError:
                check_model_weights_finite(self.model)  # NaN weights: say so and where, not "lower the guidance"
                raise

    # -- 4. decoding ---------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latents -> images [B, H, W, 3] float in 0..1 on the CPU.

        ``tiled``: decode tile by tile (bounded memory for large images); None = above 1024x1024.
        """
        check_latents(latents, self.model.latent_channels)
        pixels = latents.shape[-1] * latents.shape[-2] * self.vae_scale_factor**2
        tiled = pixels > TILED_DECODE_ABOVE if tiled is None else tiled
        with self.placement.use("vae") as vae:
            vae.enable_tiling() if tiled else vae.disable_tiling()
            return decode_latents(vae, latents)

    # -- one-call jobs ---------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULTS.steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
        sampler: str = DEFAULTS.sampler,
        seed: int = DEFAULTS.seed,
        num_images_per_prompt: int = DEFAULTS.num_images_per_prompt,
        layers="default",
        init_image=None,
        denoise: float = DEFAULTS.denoise,
        cache_threshold: float = DEFAULTS.cache_threshold,
        cache_max_skips: int = DEFAULTS.cache_max_skips,
        guidance_cutoff: float = DEFAULTS.guidance_cutoff,
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> GenerationOutput:
        """Text-to-image; with ``init_image`` (one image, or one per output) image-to-image at ``denoise``.

        ``cache_threshold`` (with ``cache_max_skips``) / ``guidance_cutoff``: the opt-in approximate
        accelerations of ``SamplingParams`` (step caching, guidance truncation); off by default (exact).
        """
        params = SamplingParams(steps, guidance_scale, 1.0, sampler, seed, num_images_per_prompt, denoise,
                                cache_threshold=cache_threshold, cache_max_skips=cache_max_skips,
                                guidance_cutoff=guidance_cutoff)
        init_pixels = image_batch(init_image) if init_image is not None else None  # [1 or B, H, W, 3]
        inputs = self.check_inputs(prompt, None, negative_prompt, layers=layers, params=params,
                                   width=width, height=height, init_image=init_pixels)
        if init_pixels is not None and init_pixels.shape[0] not in (1, len(inputs.prompts) * num_images_per_prompt):
            raise InvalidParameterError(
                f"Got {init_pixels.shape[0]} init images for {len(inputs.prompts) * num_images_per_prompt} outputs; "
                f"give one init image, or one per output image."
            )
        return self._run(inputs, params, init_pixels, callback, check_cancel)

    def edit(
        self,
        prompt: str | list[str],
        images,
        negative_prompt: str = "",
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULTS.steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
        image_guidance_scale: float = DEFAULTS.image_guidance_scale,
        sampler: str = DEFAULTS.sampler,
        seed: int = DEFAULTS.seed,
        num_images_per_prompt: int = DEFAULTS.num_images_per_prompt,
        layers="default",
        cache_threshold: float = DEFAULTS.cache_threshold,
        cache_max_skips: int = DEFAULTS.cache_max_skips,
        guidance_cutoff: float = DEFAULTS.guidance_cutoff,
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> GenerationOutput:
        """Instruction editing: ``images`` is one list of input images per prompt (or one shared list).

        ``cache_threshold`` / ``cache_max_skips`` / ``guidance_cutoff``: as in ``generate`` (off by default).
        """
        params = SamplingParams(steps, guidance_scale, image_guidance_scale, sampler, seed, num_images_per_prompt,
                                cache_threshold=cache_threshold, cache_max_skips=cache_max_skips,
                                guidance_cutoff=guidance_cutoff)
        inputs = self.check_inputs(prompt, images, negative_prompt, layers=layers, params=params,
                                   width=width, height=height)
        return self._run(inputs, params, None, callback, check_cancel)

    def _run(self, inputs: CheckedInputs, params: SamplingParams, init_pixels, callback, check_cancel):
        cond = self._encode(inputs, check_cancel=check_cancel)
        init_latents = self._encode_pixels(init_pixels) if init_pixels is not None else None
        latents = self.run_sampler(cond, inputs.width, inputs.height, params, init_latents, callback, check_cancel)
        if check_cancel is not None:
            check_cancel()
        tensors = self.decode(latents)
        images = [Image.fromarray(array) for array in images_to_uint8(tensors)]
        return GenerationOutput(images, tensors, latents)


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise InvalidParameterError(
            f"prompt must be a string or a list of strings, got {type(prompt).__name__}."
        )
    if not prompts:
        raise InvalidParameterError("No prompt given: pass at least one prompt (it may be empty).")
    check_prompt_count(len(prompts))
    for item in prompts:
        if not isinstance(item, str):
            raise InvalidParameterError(f"Prompts must be strings, got {type(item).__name__}.")
        check_text(item, "prompt")
    empty = [index for index, item in enumerate(prompts) if not item.strip()]
    if empty:  # allowed (the official code accepts it), but almost always a forgotten prompt box
        logger.warning(
            "Prompt %s is empty: the image is generated with no text to follow. Type a prompt if that is not "
            "what you want.",
            ", ".join(str(i + 1) for i in empty) if len(prompts) > 1 else "1 of 1",
        )
    return list(prompts)


def _check_prompt_seeds(prompt_seeds: Sequence[int] | None, prompts: int, params: SamplingParams) -> None:
    """One valid seed per prompt (each checked like ``params.seed``), or None."""
    if prompt_seeds is None:
        return
    if not isinstance(prompt_seeds, (list, tuple)) or len(prompt_seeds) != prompts:
        raise InvalidParameterError(f"prompt_seeds must be a list of one seed per prompt ({prompts}), "
                                    f"got {prompt_seeds!r}.")
    for seed in prompt_seeds:
        replace(params, seed=seed).validate()


class RecentCache(OrderedDict):
    """A mapping that keeps its ``size`` most recently used entries (0: keeps nothing)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def _images_key(per_prompt_images: list[list[Image.Image]] | None):
    """A content hash of normalised input images (PIL RGB), so equal pixels hit the conditioning cache.

    Hashing after normalisation keys exactly what the MLLM sees: size, mode and pixels of each
    image, grouped per prompt.
    """
    if per_prompt_images is None:
        return None
    return tuple(tuple(image_fingerprint(image) for image in images) for images in per_prompt_images)
