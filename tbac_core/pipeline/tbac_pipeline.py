"""``TBACPipeline``: text-to-image, editing and image-to-image in a few calls, for scripts.

    from tbac_core import TBACPipeline
    pipe = TBACPipeline.from_pretrained("models/tbac/TBAC-UniImage-3B")
    images = pipe.generate("a red cat on a blue chair", seed=42).images   # list of PIL images
    edited = pipe.edit("make the cat green", images=[images[0]], seed=1).images
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..devices import resolve_device
from ..errors import InvalidParameterError
from ..ladder.conditioning import LadderConditioning
from ..modeling.model import TBACModel
from ..modeling.vae import decode_latents, encode_images
from ..params import SamplingParams, check_batch, check_size
from ..processing.images import images_to_uint8, pil_to_tensor, to_pil_rgb
from .placement import MemoryModePlacement, Placement
from .sampling import StepCallback, denoise, initial_noise

TILED_DECODE_ABOVE = 1024 * 1024  # pixels per image; DC-AE decodes larger images tile by tile


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    tensors: torch.Tensor  # [B, H, W, 3] float in 0..1, CPU
    latents: torch.Tensor  # [B, C, h, w] float32


class TBACPipeline:
    """Runs a ``TBACModel``: encode, sample, decode, with a placement and a conditioning cache.

    ``placement``: where each part runs (see ``tbac_core.pipeline.placement``); by default the
    library's ``memory`` mode ``full`` / ``offload-mllm`` / ``sequential`` on ``device``.
    ``cache_size``: how many recent conditionings are kept, so re-running an unchanged prompt
    does not run the MLLM again (0 disables; bounded so long queues keep memory flat).
    """

    def __init__(self, model: TBACModel, *, memory: str = "full", device=None, cache_size: int = 8,
                 compile_dit: bool = False, placement: Placement | None = None):
        self.model = model
        if placement is None:
            placement = MemoryModePlacement(model, resolve_device(device) if device else model.device, memory)
        self.placement = placement
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, LadderConditioning] = OrderedDict()
        if compile_dit:
            for block in model.dit.transformer.transformer_blocks:
                block.compile()

    @classmethod
    def from_pretrained(cls, checkpoint_dir, *, memory: str = "full", device=None, cache_size: int = 8,
                        compile_dit: bool = False, **load_kwargs) -> "TBACPipeline":
        """Load a checkpoint; outside ``full`` mode parts are read to the CPU and moved on use."""
        device = resolve_device(device)
        load_device = device if memory == "full" else torch.device("cpu")
        model = TBACModel.from_pretrained(checkpoint_dir, device=load_device, **load_kwargs)
        return cls(model, memory=memory, device=device, cache_size=cache_size, compile_dit=compile_dit)

    # -- building blocks -------------------------------------------------------------------
    def encode(self, prompt, images=None, negative_prompt: str = "", layers="default",
               keep_all_rungs: bool = False, check_cancel: Callable[[], None] | None = None) -> LadderConditioning:
        """``TBACModel.encode`` with the MLLM placed per the memory mode and recent results reused."""
        key = (_freeze(prompt), _images_key(images), negative_prompt, _freeze(layers), keep_all_rungs)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with self.placement.use("mllm"):
            cond = self.model.encode(prompt, images=images, negative_prompt=negative_prompt, layers=layers,
                                     keep_all_rungs=keep_all_rungs, check_cancel=check_cancel)
        if self.cache_size > 0:
            self._cache[key] = cond
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return cond

    def clear_cache(self) -> None:
        self._cache.clear()

    def resolve_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Fill in the model's trained size and refuse impossible ones, before any work is done."""
        size = self.model.config.default_image_size
        width = size if width is None else width
        height = size if height is None else height
        check_size(width, height, self.model.vae_scale)
        return width, height

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
        factor = self.model.vae_scale
        check_size(width, height, factor)
        check_batch(batch)
        return (batch, self.model.latent_channels, height // factor, width // factor)

    def sample(
        self,
        cond: LadderConditioning,
        *,
        width: int | None = None,
        height: int | None = None,
        params: SamplingParams = SamplingParams(),
        init_latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
        noise_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise from seeded noise (or from ``init_latents`` with ``params.denoise < 1``).

        ``noise_mask`` (with ``init_latents``): only where it is 1 may the latents change (inpainting).
        """
        params.validate()
        cond.check_model(self.model.identity)
        width, height = self.resolve_size(width, height)
        if init_latents is not None:
            height, width = (d * self.model.vae_scale for d in init_latents.shape[-2:])
        shape = self.latent_shape(cond.batch_size * params.num_images_per_prompt, width, height)
        noise = initial_noise(params.seed, shape)
        if init_latents is not None and init_latents.shape[0] != shape[0]:
            if init_latents.shape[0] != 1:
                raise InvalidParameterError(
                    f"init latents have batch {init_latents.shape[0]}; expected 1 or {shape[0]}."
                )
            init_latents = init_latents.expand(shape[0], -1, -1, -1)
        with self.placement.use("dit") as dit:
            return denoise(
                dit, cond, noise, self.model.scheduler_config, params,
                init_latents=init_latents, callback=callback, check_cancel=check_cancel, noise_mask=noise_mask,
            )

    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latents -> images [B, H, W, 3] float in 0..1 on the CPU.

        ``tiled``: decode tile by tile (bounded memory for large images); None = above 1024x1024.
        """
        pixels = latents.shape[-1] * latents.shape[-2] * self.model.vae_scale**2
        tiled = pixels > TILED_DECODE_ABOVE if tiled is None else tiled
        with self.placement.use("vae") as vae:
            vae.enable_tiling() if tiled else vae.disable_tiling()
            return decode_latents(vae, latents)

    def encode_image(self, images) -> torch.Tensor:
        """Images (PIL, or [B, H, W, 3] tensor in 0..1) -> latents, for image-to-image."""
        tensor = _as_image_batch(images)
        factor = self.model.vae_scale
        check_size(tensor.shape[2], tensor.shape[1], factor)
        with self.placement.use("vae") as vae:
            return encode_images(vae, tensor)

    # -- one-call jobs ---------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        guidance_scale: float = 4.5,
        sampler: str = "dpm++",
        seed: int = 0,
        num_images_per_prompt: int = 1,
        layers="default",
        init_image=None,
        denoise: float = 1.0,
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> GenerationOutput:
        params = SamplingParams(steps, guidance_scale, 1.0, sampler, seed, num_images_per_prompt, denoise)
        params.validate()
        if init_image is None:
            self.resolve_size(width, height)
        cond = self.encode(prompt, negative_prompt=negative_prompt, layers=layers, check_cancel=check_cancel)
        init_latents = self.encode_image(init_image) if init_image is not None else None
        latents = self.sample(cond, width=width, height=height, params=params, init_latents=init_latents,
                              callback=callback, check_cancel=check_cancel)
        return self._output(latents, check_cancel)

    def edit(
        self,
        prompt: str | list[str],
        images,
        negative_prompt: str = "",
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        guidance_scale: float = 4.5,
        image_guidance_scale: float = 1.5,
        sampler: str = "dpm++",
        seed: int = 0,
        num_images_per_prompt: int = 1,
        layers="default",
        callback: StepCallback | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> GenerationOutput:
        """Instruction editing: ``images`` is one list of input images per prompt (or one shared list)."""
        params = SamplingParams(steps, guidance_scale, image_guidance_scale, sampler, seed, num_images_per_prompt)
        params.validate()
        self.resolve_size(width, height)
        cond = self.encode(prompt, images=images, negative_prompt=negative_prompt, layers=layers,
                           check_cancel=check_cancel)
        latents = self.sample(cond, width=width, height=height, params=params,
                              callback=callback, check_cancel=check_cancel)
        return self._output(latents, check_cancel)

    def _output(self, latents: torch.Tensor, check_cancel=None) -> GenerationOutput:
        if check_cancel is not None:
            check_cancel()
        tensors = self.decode(latents)
        images = [Image.fromarray(array) for array in images_to_uint8(tensors)]
        return GenerationOutput(images, tensors, latents)


def _freeze(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _images_key(images):
    """A content hash of input images, so equal pixels hit the conditioning cache."""
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    digest = hashlib.sha256()
    for item in images:
        for image in item if isinstance(item, (list, tuple)) else [item]:
            digest.update(b"|")
            if isinstance(image, torch.Tensor):
                digest.update(str(tuple(image.shape)).encode())
                digest.update(image.detach().cpu().contiguous().numpy().tobytes())
            elif isinstance(image, Image.Image):
                digest.update(f"{image.mode}{image.size}".encode())
                digest.update(image.tobytes())
            else:
                digest.update(np.asarray(image).tobytes())
        digest.update(b"/")
    return digest.hexdigest()


def _as_image_batch(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images if images.ndim == 4 else images[None]
        return tensor.float().clamp(0, 1)
    if not isinstance(images, (list, tuple)):
        images = [images]
    tensors = [pil_to_tensor(to_pil_rgb(img)) for img in images]
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise InvalidParameterError("Images of one batch must share one size; resize them first.")
    return torch.stack(tensors)
