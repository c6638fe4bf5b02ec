"""Masks for inpainting and masked edits: ComfyUI's ``noise_mask`` convention.

A mask is 1 where the image may change and 0 where it must stay (``SetLatentNoiseMask``). It comes
at pixel or latent resolution as ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; sampling uses it at
latent resolution and blends the unmasked region back to the (re-noised) input latents at every
step, and after decoding ``composite_pixels`` pastes the untouched input pixels back (the DC-AE's
receptive field otherwise lets the edit bleed a little past the mask edge).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """Any accepted mask layout -> ``[B, 1, H, W]`` float32 in 0..1."""
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise InvalidParameterError(
            f"A mask must be [H, W], [B, H, W] or [B, 1, H, W]; got shape {tuple(mask.shape)}."
        )
    return mask.float().clamp(0, 1)


def resize_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """A mask as ``[batch, 1, height, width]``: resized bilinearly, a batch of 1 repeated."""
    mask = as_mask_batch(mask)
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(batch, -1, -1, -1)
    raise InvalidParameterError(f"The mask has batch {mask.shape[0]}; expected 1 or {batch} (one per image).")


def blend_unmasked(latents: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``latents`` where ``mask`` is 1, ``keep`` where it is 0 (all ``[B, C, h, w]`` / ``[B, 1, h, w]``)."""
    return latents * mask + keep * (1.0 - mask)


def composite_pixels(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decoded images with the original pixels pasted back outside the mask.

    ``decoded`` / ``original``: ``[B, H, W, 3]`` in 0..1 (ComfyUI's IMAGE; an original batch of 1 is
    shared); ``mask`` in any accepted layout, at any resolution. Returns ``[B, H, W, 3]``.
    """
    batch, height, width, _ = decoded.shape
    if original.shape[1:3] != (height, width):
        raise InvalidParameterError(
            f"The original images are {original.shape[2]}x{original.shape[1]} but the decoded ones are "
            f"{width}x{height}; composite onto the image that was encoded (after any crop)."
        )
    if original.shape[0] not in (1, batch):
        raise InvalidParameterError(f"{original.shape[0]} original images for {batch} decoded ones; give 1 or {batch}.")
    pixel_mask = resize_mask(mask, batch, height, width).permute(0, 2, 3, 1).to(decoded)  # [B, H, W, 1]
    return decoded * pixel_mask + original.to(decoded).expand(batch, -1, -1, -1) * (1.0 - pixel_mask)


class InpaintBlend:
    """What the denoising loop needs to honour a noise mask (ComfyUI's ``KSamplerX0Inpaint`` idea).

    ``init`` / ``noise``: ``[B, C, h, w]`` input latents and the seeded noise; ``mask``: ``[B, 1, h, w]``
    at latent resolution. Before each DiT call the unmasked region is set to ``init`` noised to the
    step's sigma; after the last step it is ``init`` exactly.
    """

    def __init__(self, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.init, self.noise, self.mask = init, noise, mask

    def to(self, device) -> "InpaintBlend":
        return InpaintBlend(*(t.to(device=device, dtype=torch.float32) for t in (self.init, self.noise, self.mask)))

    def before_step(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return blend_unmasked(latents, (1.0 - sigma) * self.init + sigma * self.noise, self.mask)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return blend_unmasked(latents, self.init, self.mask)


def inpaint_blend(noise_mask: torch.Tensor, init_latents: torch.Tensor | None, noise: torch.Tensor) -> InpaintBlend:
    """Check a noise mask against the job and bring it to latent resolution (``noise``: [B, C, h, w])."""
    if init_latents is None:
        raise InvalidParameterError(
            "A noise mask needs the latents of the image to inpaint: connect a latent (e.g. from "
            "'TBAC Encode Image') to the sampler."
        )
    batch, _, height, width = noise.shape
    mask = resize_mask(noise_mask, batch, height, width)
    return InpaintBlend(init_latents.float().expand(batch, -1, -1, -1), noise, mask)
