"""DC-AE decode/encode between latents and ``[B, H, W, C]`` float images in 0..1.

Latents here are always *scaled*: the DC-AE's latents times its ``scaling_factor`` (after removing
its ``shift_factor``), i.e. what the DiT sees and what a LATENT holds. ``decode_signed`` /
``encode_signed`` are the bare conversions with pixels in -1..1, channels first (ComfyUI's
``first_stage_model`` convention); ``decode_latents`` / ``encode_images`` add the 0..1 image layout.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderDC
from torch import nn

from .contiguous import make_inputs_contiguous
from .dc_up_block import use_view_shortcut_up_blocks
from .onednn_linear import use_onednn_linears
from .rms_norm import use_lean_rms_norms


def _shift(vae) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def use_contiguous_projections(vae: AutoencoderDC) -> int:
    """The DC-AE's attention projections read ``movedim`` views: give them contiguous inputs (contiguous.py:
    why; the real DC-AE's 512x512 decode in bf16 on the CPU: 3.3-3.4 -> 2.3-2.4 s) -> projections hooked."""
    return make_inputs_contiguous(module for module in vae.modules() if isinstance(module, nn.Linear))


def speed_up_vae(vae: AutoencoderDC) -> None:
    """The exact speed-ups of the DC-AE: contiguous projection inputs, lean RMS norms (rms_norm.py),
    up-blocks whose shortcut is a view of their input (dc_up_block.py), float32 CPU products through
    oneDNN (onednn_linear.py)."""
    use_contiguous_projections(vae)
    use_onednn_linears(vae)
    use_lean_rms_norms(vae)
    use_view_shortcut_up_blocks(vae)


def decode_signed(vae: AutoencoderDC, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> pixels [B, 3, H, W] in about -1..1, in the VAE's dtype and device."""
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor + _shift(vae)
    return vae.decode(scaled).sample


def encode_signed(vae: AutoencoderDC, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in -1..1 -> scaled latents [B, C, H/f, W/f] (float32)."""
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent
    return ((latents - _shift(vae)) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(vae: AutoencoderDC, latents: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
    """Latents [B, C, h, w] (scaled, as the DiT sees them) -> images in 0..1.

    Returns [B, H, W, 3] float32 on the CPU (ComfyUI's IMAGE layout), or [B, 3, H, W] with
    ``channels_last=False``.
    """
    images = (decode_signed(vae, latents).float() / 2 + 0.5).clamp(0, 1)
    if channels_last:
        images = images.permute(0, 2, 3, 1)
    return images.cpu()


@torch.no_grad()
def encode_images(vae: AutoencoderDC, images: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, 3] in 0..1 -> scaled latents [B, C, H/f, W/f] (float32)."""
    param = next(vae.parameters())  # cast before scaling, as the official pipeline does (same bits in bf16)
    return encode_signed(vae, images.permute(0, 3, 1, 2).to(device=param.device, dtype=param.dtype) * 2 - 1)
