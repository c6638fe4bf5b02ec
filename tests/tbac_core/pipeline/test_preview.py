"""Live previews: the latent -> RGB projection fitted from the VAE, and per-step previews."""
from __future__ import annotations

import torch

from tbac_core.params import SamplingParams
from tbac_core.pipeline import LatentRGBProjection, PreviewProjections
from tbac_core.pipeline.preview import preview_size


def test_the_fitted_projection_approximates_the_decoder(pipe):
    model = pipe.model
    projection = PreviewProjections().get(model)
    assert projection.weight.shape == (3, model.latent_channels) and projection.bias.shape == (3,)
    latents = torch.randn(2, model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.nn.functional.avg_pool2d(pipe.decode(latents).permute(0, 3, 1, 2), model.vae_scale_factor)
    error = (projection.project(latents).permute(0, 3, 1, 2) - target).abs().mean()
    baseline = (target - target.mean()).abs().mean()  # predicting the mean colour
    assert error < baseline


def test_projections_are_cached_per_model(pipe, monkeypatch):
    cache = PreviewProjections()
    first = cache.get(pipe.model)
    monkeypatch.setattr(LatentRGBProjection, "fit", classmethod(lambda cls, *a: (_ for _ in ()).throw(AssertionError)))
    assert cache.get(pipe.model) is first


def test_every_step_gives_an_rgb_preview_of_the_image_size(pipe):
    projection = PreviewProjections().get(pipe.model)
    cond = pipe.encode("a red cat")
    previews = []
    pipe.sample(cond, width=64, height=32, params=SamplingParams(steps=3, sampler="euler"),
                callback=lambda info: previews.append(projection.step_preview(info, pipe.model.vae_scale_factor, 512)))
    assert [(p.mode, p.size) for p in previews] == [("RGB", (64, 32))] * 3
    assert preview_size(1024, 512, 512) == (512, 256) and preview_size(64, 32, 512) == (64, 32)
