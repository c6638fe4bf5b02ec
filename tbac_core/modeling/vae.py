"""DC-AE decode/encode between latents and ``[B, H, W, C]`` float images in 0..1."""
from __future__ import annotations

import torch
from diffusers import AutoencoderDC


def _shift(vae) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def decode_latents(vae: AutoencoderDC, latents: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
    """Latents [B, C, h, w] (scaled, as the DiT sees them) -> images in 0..1.

    Returns [B, H, W, 3] float32 on the CPU (ComfyUI's IMAGE layout), or [B, 3, H, W] with
    ``channels_last=False``.
    """
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor + _shift(vae)
    decoded = vae.decode(scaled).sample
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if channels_last:
        images = images.permute(0, 2, 3, 1)
    return images.cpu()


@torch.no_grad()
def encode_images(vae: AutoencoderDC, images: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, 3] in 0..1 -> scaled latents [B, C, H/f, W/f] (float32)."""
    param = next(vae.parameters())
    pixels = images.permute(0, 3, 1, 2).to(device=param.device, dtype=param.dtype) * 2 - 1
    latents = vae.encode(pixels).latent
    return ((latents - _shift(vae)) * vae.config.scaling_factor).float()

