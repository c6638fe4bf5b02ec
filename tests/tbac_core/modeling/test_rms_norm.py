"""LeanRMSNorm gives diffusers' RMSNorm's bits with fewer temporaries; the DC-AE uses it."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from tbac_core.modeling.rms_norm import LeanRMSNorm, use_diffusers_rms_norms, use_lean_rms_norms


def make_norm(channels: int, dtype, affine: bool = True, bias: bool = True, weight_dtype=None) -> RMSNorm:
    norm = RMSNorm(channels, eps=1e-5, elementwise_affine=affine, bias=bias)
    with torch.no_grad():
        if affine:
            norm.weight.normal_(1.0, 0.3)
            if bias:
                norm.bias.normal_(0.0, 0.3)
    return norm.to(weight_dtype or dtype)


def feature_map(dtype, channels=24, side=9, seed=0) -> torch.Tensor:
    """A [1, C, H, W] map seen as the DC-AE hands it to its norms: the movedim view [1, H, W, C]."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, channels, side, side, generator=generator) * 4).to(dtype).movedim(1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_same_bits_as_diffusers(dtype, affine, bias):
    source = make_norm(24, dtype, affine, bias)
    lean = LeanRMSNorm(source)
    for hidden in (feature_map(dtype), feature_map(dtype).contiguous(), feature_map(dtype)[:, 2:, 1:]):
        before = hidden.clone()
        with torch.no_grad():
            expected, got = source(hidden), lean(hidden)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
        assert torch.equal(hidden, before)  # its input is never overwritten (a float32 input is its own copy)


def test_same_bits_with_parameters_in_another_dtype():
    """Half input, float32 weight and bias: diffusers' result is float32; a bf16 weight with a float32 bias too."""
    hidden = feature_map(torch.bfloat16)
    for source in (make_norm(24, torch.bfloat16, weight_dtype=torch.float32), make_norm(24, torch.bfloat16)):
        if source.weight.dtype == torch.bfloat16:
            source.bias.data = source.bias.data.float()
        with torch.no_grad():
            expected, got = source(hidden), LeanRMSNorm(source)(hidden)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_with_autograd_it_overwrites_nothing_and_gives_the_same_gradients():
    source = make_norm(24, torch.float32)
    lean = LeanRMSNorm(copy.deepcopy(source))
    hidden = feature_map(torch.float32).detach().requires_grad_(True)
    twin = hidden.detach().clone().requires_grad_(True)
    source(hidden).square().sum().backward()
    lean(twin).square().sum().backward()  # an in-place write on a saved tensor would raise here
    assert torch.allclose(twin.grad, hidden.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lean.weight.grad, source.weight.grad, rtol=1e-5, atol=1e-5)


def test_the_dc_ae_decodes_the_same_bits_with_its_norms_swapped(pipe):
    vae = pipe.model.vae  # loaded with the swap
    assert any(isinstance(m, LeanRMSNorm) for m in vae.modules())
    assert not any(LeanRMSNorm.supports(m) for m in vae.modules())
    plain = copy.deepcopy(vae)
    assert use_diffusers_rms_norms(plain) > 0  # diffusers' own module on the same weights
    assert list(plain.state_dict()) == list(vae.state_dict())  # same checkpoint keys
    latents = torch.randn(1, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, plain.decode(latents).sample)
        assert torch.equal(vae.encode(images).latent, plain.encode(images).latent)


def test_swap_counts_and_keeps_parameter_names():
    model = torch.nn.Sequential(make_norm(8, torch.float32), torch.nn.Linear(8, 8), make_norm(8, torch.float32, False))
    keys = list(model.state_dict())
    assert use_lean_rms_norms(model) == 2
    assert use_lean_rms_norms(model) == 0  # nothing left to swap
    assert list(model.state_dict()) == keys
    assert use_diffusers_rms_norms(model) == 2 and not any(isinstance(m, LeanRMSNorm) for m in model)
    assert list(model.state_dict()) == keys
