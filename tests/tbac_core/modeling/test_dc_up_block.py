"""The DC-AE up-blocks (modeling/dc_up_block.py): the shortcut a view (diffusers' bits, no copies), the
nearest x2 upsampling folded into a transposed convolution (diffusers' values within rounding)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

from tbac_core.modeling.dc_up_block import (
    ViewShortcutDCUpBlock,
    folded_upsampling_kernel,
    shortcut_view,
    use_diffusers_up_blocks,
    use_folded_upsampling,
    use_view_shortcut_up_blocks,
)
from streamed_layers import forbid_calls, stream

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
def test_same_bits_as_diffusers_without_the_fold(channels, interpolate, dtype):
    source = _block(*channels, interpolate, dtype)
    ours = ViewShortcutDCUpBlock(source)
    ours.fold_upsampling = False
    for name, hidden in _inputs(channels[0], dtype).items():
        with torch.no_grad():
            expected, got = source(hidden), ours(hidden)
        assert got.shape == expected.shape, name
        assert torch.equal(got, expected), name
        assert torch.equal(hidden, _inputs(channels[0], dtype)[name]), name  # the input is never written


# Largest |error| against a float64 reference, as a share of the reference's largest |value|: the
# unfolded block's own rounding is ~1e-7 (fp32) and ~2e-3 (bf16); a wrong fold is off by O(1).
FOLD_ERROR = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels", CHANNELS, ids=[f"repeats{o * 4 // i}" for i, o in CHANNELS])
def test_folded_upsampling_equals_diffusers_within_rounding(channels, dtype):
    source = _block(*channels, True, dtype)
    ours = ViewShortcutDCUpBlock(source)
    reference_block = copy.deepcopy(source).double()
    for name, hidden in _inputs(channels[0], dtype).items():
        with torch.no_grad():
            reference = reference_block(hidden.double())
            got, unfolded = ours(hidden), source(hidden)
        assert got.shape == reference.shape and got.dtype == dtype, name
        assert _relative_error(got, reference) <= max(FOLD_ERROR[dtype], 2 * _relative_error(unfolded, reference)), name
        assert torch.equal(hidden, _inputs(channels[0], dtype)[name]), name  # the input is never written


def test_the_folded_kernel_is_the_upsampled_convolution():
    """Nearest x2 then a 3x3 conv (padding 1) == the folded stride-2 transposed conv, on every pixel incl. borders."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    hidden = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(hidden, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    kernel = folded_upsampling_kernel(weight.float()).double()
    assert kernel.shape == (2, 3, 4, 4)
    got = F.conv_transpose2d(hidden, kernel, bias, stride=2, padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_fold_reads_the_live_weight():
    """Nothing is cached: a weight changed in place (a merged adapter, a memory manager's patch) is used."""
    source = _block(8, 4, True)
    ours = ViewShortcutDCUpBlock(source)
    hidden = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        before = ours(hidden)
        source.conv.weight.mul_(2)
        after, expected = ours(hidden), source(hidden)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_an_offloadable_conv_folds_with_its_weights_moved_for_the_call(monkeypatch):
    """In ComfyUI every layer is offloadable (layer_offload); the fold must still run, on moved weights
    (that they reach the input's device: test_layer_offload's meta-device test)."""
    source = _block(8, 4, True)
    plain = ViewShortcutDCUpBlock(copy.deepcopy(source))
    streamed = ViewShortcutDCUpBlock(source)
    forbid_calls(monkeypatch, stream(streamed.conv, streamed))
    hidden = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        assert torch.equal(streamed(hidden), plain(hidden))


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


def test_the_library_vae_uses_them_and_decodes_as_diffusers(pipe, monkeypatch):
    vae = pipe.model.vae
    blocks = [m for m in vae.modules() if isinstance(m, ViewShortcutDCUpBlock)]
    assert blocks and all(block.interpolate for block in blocks)  # the SANA DC-AE's decoder
    latents = torch.randn(1, pipe.model.latent_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    folds, real = [], F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: folds.append(1) or real(*a, **k))
    ours = pipe.decode(latents, tiled=False)
    assert len(folds) == len(blocks)  # every up-block folded its upsampling
    try:
        assert use_folded_upsampling(vae, enabled=False) == len(blocks)
        unfolded = pipe.decode(latents, tiled=False)
        assert use_diffusers_up_blocks(vae) == len(blocks)
        assert torch.equal(pipe.decode(latents, tiled=False), unfolded)  # the view shortcut: the same bits
        torch.testing.assert_close(ours, unfolded, rtol=0, atol=1e-5)  # the fold: within rounding
    finally:
        use_view_shortcut_up_blocks(vae)
        use_folded_upsampling(vae)
