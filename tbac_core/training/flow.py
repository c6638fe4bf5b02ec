"""The flow-matching objective of TBAC-UniImage (``loss_type="flow"`` of the official model).

Per image: draw u ~ U[0, 1), take the training schedule's timestep and sigma at index
``floor(u * num_train_timesteps)`` (uniform weighting), mix ``noisy = (1 - sigma) * x0 + sigma *
noise``, and regress the DiT's output on the velocity ``noise - x0`` with a mean squared error.

The schedule is diffusers' ``FlowMatchEulerDiscreteScheduler`` before ``set_timesteps``: sigmas
``shift * s / (1 + (shift - 1) * s)`` of s = 1..1/N, timesteps ``1000 * sigma``. The shift comes
from the scheduler config (``flow_shift``, SANA's 3.0), the same shift the sampler uses, so
training spends its steps where sampling does. (The official code builds this scheduler from
SANA's DPM-Solver config, whose ``flow_shift`` key the Euler scheduler does not read, so it
effectively trains with shift 1.0; pass ``shift=1.0`` for that.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # [B, C, h, w]
    target: torch.Tensor  # [B, C, h, w] velocity noise - x0
    timesteps: torch.Tensor  # [B] float, 1000 * sigma
    sigmas: torch.Tensor  # [B]


@dataclass
class NoiseDraws:
    indices: torch.Tensor  # [B] long, schedule points
    noise: torch.Tensor  # [B, C, h, w] float32, on the CPU

    def select(self, positions: list[int]) -> "NoiseDraws":
        return NoiseDraws(self.indices[positions], self.noise[positions])


class FlowMatchingObjective:
    def __init__(self, scheduler_config: dict, shift: float | None = None):
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.shift = float(scheduler_config.get("flow_shift", scheduler_config.get("shift", 1.0))
                           if shift is None else shift)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        self.timesteps = scheduler.timesteps.float().clone()  # [N], descending
        self.sigmas = scheduler.sigmas[: self.num_train_timesteps].float().clone()  # [N] (the final 0 dropped)

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        """Noise ``latents`` at uniformly drawn schedule points; randomness from a CPU ``generator``."""
        return self.apply(latents, self.draw(latents.shape[0], tuple(latents.shape[1:]), generator))

    def draw(self, count: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> "NoiseDraws":
        """The random part of ``noise`` for ``count`` images, drawn once per global batch.

        Drawing for the whole global batch and slicing it (``NoiseDraws.select``) gives every
        example the same noise whichever process or micro-batch it lands in.
        """
        u = torch.rand(count, generator=generator)
        indices = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        noise = torch.randn((count, *latent_shape), generator=generator, dtype=torch.float32)
        return NoiseDraws(indices, noise)

    def apply(self, latents: torch.Tensor, draws: "NoiseDraws") -> NoisedBatch:
        batch = latents.shape[0]
        noise = draws.noise.to(latents.device)
        sigmas = self.sigmas[draws.indices].to(latents.device)
        x0 = latents.float()
        sigma = sigmas.view(batch, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigma) * x0 + sigma * noise
        return NoisedBatch(noisy, noise - x0, self.timesteps[draws.indices].to(latents.device), sigmas)

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over images of each image's mean squared error (uniform weighting)."""
        per_image = ((prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
        return per_image.mean()
