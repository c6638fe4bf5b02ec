"""Masks for inpainting and masked edits: ComfyUI's ``noise_mask`` convention.

A mask is 1 where the image may change and 0 where it must stay (``SetLatentNoiseMask``). It comes
at pixel or latent resolution as ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; sampling uses it at
latent resolution and blends the unmasked region back to the (re-noised) input latents at every
step, and after decoding ``composite_pixels`` pastes the untouched input pixels back (the DC-AE's
receptive field otherwise lets the edit bleed a little past the mask edge).

A mask drawn on the whole picture follows the picture through the encoder's centre crop to a
multiple of the latent factor (``crop_like_image``), so for sizes such as 520x390 the region that is
resampled and the region pasted back are the pixels the user painted, not ones shifted by the crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from ..processing import crop_to_multiple


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


def crop_like_image(mask: torch.Tensor, height: int, width: int, factor: int) -> torch.Tensor:
    """A mask of the uncropped picture cut as the encoder cut the picture (``crop_to_multiple``).

    ``mask`` in any accepted layout; ``height`` / ``width``: the encoded picture's pixel size (a
    multiple of ``factor``). A mask whose size crops to exactly that size is centre-cropped the same
    way; any other mask (already cropped, or at latent or another resolution) is returned as
    ``[B, 1, H, W]`` unchanged, to be resized.
    """
    mask = as_mask_batch(mask)
    mask_height, mask_width = mask.shape[-2:]
    if (mask_height, mask_width) == (height, width):
        return mask
    if (mask_height - mask_height % factor, mask_width - mask_width % factor) != (height, width):
        return mask
    return crop_to_multiple(mask.permute(0, 2, 3, 1), factor).permute(0, 3, 1, 2)  # via [B, H, W, 1]


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


def composite_pixels(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                     factor: int | None = None) -> torch.Tensor:
    """Decoded images with the original pixels pasted back outside the mask.

    ``decoded`` / ``original``: ``[B, H, W, 3]`` in 0..1 (ComfyUI's IMAGE; an original batch of 1 is
    shared); ``mask`` in any accepted layout, at any resolution; with the latent ``factor``, a mask of
    the picture before the encoder's crop is cropped alike. Returns ``[B, H, W, 3]``.
    """
    batch, height, width, _ = decoded.shape
    if original.shape[1:3] != (height, width):
        raise InvalidParameterError(
            f"The original images are {original.shape[2]}x{original.shape[1]} but the decoded ones are "
            f"{width}x{height}; composite onto the image that was encoded (after any crop)."
        )
    if original.shape[0] not in (1, batch):
        raise InvalidParameterError(f"{original.shape[0]} original images for {batch} decoded ones; give 1 or {batch}.")
    if factor is not None:
        mask = crop_like_image(mask, height, width, factor)
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


def inpaint_blend(noise_mask: torch.Tensor, init_latents: torch.Tensor | None, noise: torch.Tensor,
                  factor: int | None = None) -> InpaintBlend:
    """Check a noise mask against the job and bring it to latent resolution (``noise``: [B, C, h, w]).

    ``factor``: the latent factor; a pixel mask of the picture before the encoder's crop is then
    cropped alike before it is resized (see ``crop_like_image``).
    """
    if init_latents is None:
        raise InvalidParameterError(
            "A noise mask needs the latents of the image to inpaint: connect a latent (e.g. from "
            "'TBAC Encode Image') to the sampler."
        )
    batch, _, height, width = noise.shape
    if factor is not None:
        noise_mask = crop_like_image(noise_mask, height * factor, width * factor, factor)
    mask = resize_mask(noise_mask, batch, height, width)
    return InpaintBlend(init_latents.float().expand(batch, -1, -1, -1), noise, mask)
