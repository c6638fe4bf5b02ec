"""Live previews: a latent -> RGB linear projection fitted from the model's own DC-AE.

ComfyUI previews its own models with hand-measured ``latent_rgb_factors``; a TBAC checkpoint
(any DC-AE, any latent width) has none, so we fit them: decode a few random latents and images
encoded back, average-pool the decoded pixels down to latent resolution, and solve
``RGB ≈ A · latent + b`` by least squares. The fit is a few VAE calls; ``PreviewProjections``
keeps one per model identity so it runs once per loaded checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..modeling.vae import decode_latents, encode_images
from .sampling import StepInfo

FIT_SEED = 0
FIT_SAMPLES = 8  # latents decoded per fit (half random, half re-encoded decodes)
FIT_LATENT_SIDE = 8  # latent height = width of each fit sample


@dataclass(frozen=True)
class LatentRGBProjection:
    """``rgb [B, h, w, 3] = latents [B, h, w, C] @ weight.T + bias``, in 0..1 (before clamping)."""

    weight: torch.Tensor  # [3, C] float32
    bias: torch.Tensor  # [3] float32

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, latent_channels: int, vae_scale: int) -> "LatentRGBProjection":
        """Least-squares fit over pixels at latent resolution of decoded random and re-encoded latents."""
        generator = torch.Generator("cpu").manual_seed(FIT_SEED)
        half = FIT_SAMPLES // 2
        shape = (half, latent_channels, FIT_LATENT_SIDE, FIT_LATENT_SIDE)
        random_latents = torch.randn(shape, generator=generator)  # scaled latents, as the DiT sees them
        # Re-encoding decodes puts the other half of the samples on the encoder's latent manifold.
        encoded = encode_images(vae, decode_latents(vae, random_latents))
        latents = torch.cat([random_latents, encoded.cpu()])  # [N, C, h, w]
        images = decode_latents(vae, latents, channels_last=False)  # [N, 3, H, W] in 0..1
        pooled = torch.nn.functional.avg_pool2d(images, vae_scale)  # [N, 3, h, w]
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, latent_channels)  # [N*h*w, C]
        design = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)  # [N*h*w, C+1]
        targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)  # [N*h*w, 3]
        solution = torch.linalg.lstsq(design.double(), targets.double()).solution.float()  # [C+1, 3]
        return cls(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> RGB [B, h, w, 3] in 0..1."""
        x = latents.detach().float().cpu().permute(0, 2, 3, 1)
        return torch.nn.functional.linear(x, self.weight, self.bias).clamp(0, 1)

    def preview_image(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
        """The first image of the batch as a PIL RGB image, at latent resolution or resized to ``size`` (w, h)."""
        pixels = (self.project(latents[:1])[0] * 255).round().to(torch.uint8).numpy()
        image = Image.fromarray(pixels, mode="RGB")
        return image if size is None or image.size == size else image.resize(size, Image.BILINEAR)

    def step_preview(self, info: StepInfo, vae_scale: int, max_size: int,
                     num_train_timesteps: int = 1000) -> Image.Image:
        """The preview of one sampler step: its x0 estimate at image size, the longest side capped at ``max_size``."""
        clean = predicted_clean(info.latents_before, info.guided, info.timestep, num_train_timesteps)
        return self.preview_image(clean, preview_size(clean.shape[-1] * vae_scale, clean.shape[-2] * vae_scale,
                                                      max_size))


class PreviewProjections:
    """Fitted projections per model identity, so each checkpoint is fitted once per process."""

    def __init__(self):
        self._fitted: dict = {}

    def get(self, model) -> LatentRGBProjection:
        """The projection of a ``TBACModel`` (fitted on first use, on the VAE where it sits)."""
        key = (model.identity, str(model.checkpoint_dir))
        if key not in self._fitted:
            self._fitted[key] = LatentRGBProjection.fit(model.vae, model.latent_channels, model.vae_scale_factor)
        return self._fitted[key]


def predicted_clean(latents_before: torch.Tensor, velocity: torch.Tensor, timestep: torch.Tensor,
                    num_train_timesteps: int = 1000) -> torch.Tensor:
    """The flow sampler's current estimate of the clean latents: ``x0 = x_t - sigma * v``.

    Flow timesteps are ``sigma * num_train_timesteps``; previews show x0 (as ComfyUI's do), which
    is readable from the first steps on, where ``x_t`` is still mostly noise.
    """
    sigma = timestep.float().cpu() / num_train_timesteps
    return latents_before.float().cpu() - sigma * velocity.float().cpu()


def preview_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(w, h) of a preview: the image size, scaled down so that the longest side is at most ``max_size``."""
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))
