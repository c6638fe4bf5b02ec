"""Qwen2.5-VL's kernel-sized Conv3d patch embedding runs as F.linear on the same weight."""
from __future__ import annotations

import copy

import torch
from torch import nn

from tbac_core.modeling.mllm import vision_tower
from tbac_core.modeling.vision_patch_embed import LinearPatchEmbed, use_linear_patch_embed


def _transformers_patch_embed(linear: LinearPatchEmbed) -> nn.Module:
    """transformers' own module on the same weight (the arithmetic we replaced)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    channels, temporal, patch, _ = linear.patch_shape
    original = Qwen2_5_VisionPatchEmbed(patch_size=patch, temporal_patch_size=temporal, in_channels=channels,
                                        embed_dim=linear.embed_dim)
    original.proj = copy.deepcopy(linear.proj)
    return original


def test_loaded_mllm_embeds_patches_with_a_matrix_product_equal_to_the_convolution(pipe):
    patch_embed = vision_tower(pipe.model.mllm).patch_embed
    assert isinstance(patch_embed, LinearPatchEmbed)
    original = _transformers_patch_embed(patch_embed)
    patches = torch.randn(37, patch_embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(patch_embed(patches), original(patches), atol=1e-5, rtol=1e-5)
        assert use_linear_patch_embed(nn.Module()) is False  # nothing to swap: left alone
        assert LinearPatchEmbed.supports(original) and not LinearPatchEmbed.supports(patch_embed)


def test_a_wrapped_convolution_runs_as_itself():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    class Doubled(nn.Module):  # stands for a LoRA-style wrapper around the convolution
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return 2 * self.conv(x)

    source = Qwen2_5_VisionPatchEmbed(patch_size=2, temporal_patch_size=2, in_channels=3, embed_dim=8)
    expected = source(torch.ones(5, 3 * 2 * 2 * 2))
    linear = LinearPatchEmbed(source)
    linear.proj = Doubled(source.proj)
    with torch.no_grad():
        torch.testing.assert_close(linear(torch.ones(5, 24)), 2 * expected)


def test_an_offloadable_convolution_still_runs_as_a_matrix_product(monkeypatch):
    """In ComfyUI every layer is made offloadable (layer_offload); the product must not fall back to the conv."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from streamed_layers import forbid_calls, stream

    source = Qwen2_5_VisionPatchEmbed(patch_size=2, temporal_patch_size=2, in_channels=3, embed_dim=8)
    plain, streamed = LinearPatchEmbed(copy.deepcopy(source)), LinearPatchEmbed(source)
    forbid_calls(monkeypatch, stream(streamed.proj, streamed))
    patches = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(patches), plain(patches))
