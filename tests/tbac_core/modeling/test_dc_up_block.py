"""The DC-AE up-blocks with a view for a shortcut (modeling/dc_up_block.py): diffusers' bits, no copies."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

from tbac_core.modeling.dc_up_block import (
    ViewShortcutDCUpBlock,
    shortcut_view,
    use_diffusers_up_blocks,
    use_view_shortcut_up_blocks,
)

# (in_channels, out_channels): repeats = out * 4 // in = 2 and 4 (the DC-AE's), 1, 8, and 3 (no view: fallback)
CHANNELS = [(8, 4), (4, 4), (16, 4), (4, 8), (4, 3)]


def _block(in_channels, out_channels, interpolate, dtype=torch.float32) -> DCUpBlock2d:
    torch.manual_seed(0)
    return DCUpBlock2d(in_channels, out_channels, interpolate=interpolate, shortcut=True).to(dtype)


def _inputs(in_channels, dtype):
    generator = torch.Generator().manual_seed(1)
    plain = torch.randn(2, in_channels, 5, 6, generator=generator).to(dtype)
    wide = torch.randn(2, in_channels + 3, 5, 7, generator=generator).to(dtype)
    return {
        "contiguous": plain,
        "channels-last": plain.contiguous(memory_format=torch.channels_last),
        "a slice with an offset": wide[:, 2:2 + in_channels, :, 1:],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("interpolate", [True, False], ids=["interpolate", "pixel-shuffle"])
@pytest.mark.parametrize("channels", CHANNELS, ids=[f"repeats{o * 4 // i}" for i, o in CHANNELS])
def test_same_bits_as_diffusers(channels, interpolate, dtype):
    source = _block(*channels, interpolate, dtype)
    ours = ViewShortcutDCUpBlock(source)
    for name, hidden in _inputs(channels[0], dtype).items():
        with torch.no_grad():
            expected, got = source(hidden), ours(hidden)
        assert got.shape == expected.shape, name
        assert torch.equal(got, expected), name
        assert torch.equal(hidden, _inputs(channels[0], dtype)[name]), name  # the input is never written


@pytest.mark.parametrize("channels", [(8, 4), (4, 4), (16, 4), (4, 8)], ids=["r2", "r4", "r1", "r8"])
def test_the_shortcut_is_a_view_of_the_input(channels):
    in_channels, out_channels = channels
    repeats = out_channels * 4 // in_channels
    hidden = torch.randn(1, in_channels, 3, 4)
    x = torch.zeros(1, in_channels * repeats // 4, 6, 8)
    shortcut = shortcut_view(hidden, repeats, 2)
    out = x.view(shortcut.shape)
    assert out.data_ptr() == x.data_ptr() and shortcut.data_ptr() == hidden.data_ptr()
    out.add_(shortcut)
    expected = torch.nn.functional.pixel_shuffle(hidden.repeat_interleave(repeats, dim=1), 2)
    assert torch.equal(x, expected)
    assert shortcut_view(hidden, 3, 2) is None  # no stride pattern for 3: diffusers' own block


def test_with_autograd_nothing_is_overwritten_and_gradients_match():
    source = _block(8, 4, interpolate=True)
    ours = ViewShortcutDCUpBlock(copy.deepcopy(source))
    hidden = torch.randn(1, 8, 4, 4)
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    source(a).square().sum().backward()
    ours(b).square().sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6) and torch.allclose(ours.conv.weight.grad,
                                                                          source.conv.weight.grad, atol=1e-5)


def test_swaps_keep_the_checkpoint_keys_and_undo():
    model = torch.nn.Sequential(_block(8, 4, True), torch.nn.Sequential(_block(4, 4, False)))
    keys = list(model.state_dict())
    assert use_view_shortcut_up_blocks(model) == 2
    assert use_view_shortcut_up_blocks(model) == 0
    assert list(model.state_dict()) == keys
    assert use_diffusers_up_blocks(model) == 2
    assert all(type(m) is not ViewShortcutDCUpBlock for m in model.modules())


def test_the_library_vae_uses_them_and_decodes_the_same_bits(pipe):
    vae = pipe.model.vae
    assert any(isinstance(m, ViewShortcutDCUpBlock) for m in vae.modules())
    latents = torch.randn(1, pipe.model.latent_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = pipe.decode(latents, tiled=False)
    try:
        assert use_diffusers_up_blocks(vae) > 0
        assert torch.equal(pipe.decode(latents, tiled=False), ours)
    finally:
        use_view_shortcut_up_blocks(vae)
