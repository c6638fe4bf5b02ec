"""SANA's linear self-attention on token-major views (modeling/linear_attention.py): diffusers' results.

The same matrix products as diffusers' ``SanaLinearAttnProcessor2_0``, transposed: equal within
float rounding in float32, bfloat16 and float16, and gradients match. (On the DiT's own shapes
this project's CPUs even give the same bits: a 20-step medium generation, float32 and bfloat16.)
"""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

from tbac_core.modeling.linear_attention import TokenMajorLinearAttnProcessor, use_token_major_linear_attention


def _sana_self_attention(dim=64, head_dim=16) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=dim // head_dim, dim_head=head_dim,
                     processor=SanaLinearAttnProcessor2_0(), bias=False, out_bias=True).eval()


def _both(attn, hidden_states):
    attn.set_processor(SanaLinearAttnProcessor2_0())
    reference = attn(hidden_states)
    attn.set_processor(TokenMajorLinearAttnProcessor())
    return reference, attn(hidden_states)


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 7, 64), (3, 1, 64)])
def test_float32_equals_diffusers_within_rounding(shape):
    attn = _sana_self_attention()
    hidden_states = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, ours = _both(attn, hidden_states)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_diffusers_within_rounding(dtype):
    attn = _sana_self_attention().to(dtype)
    hidden_states = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        reference, ours = _both(attn, hidden_states)
    assert ours.dtype == reference.dtype == dtype
    # The float32 core rounds to the half type before the output projection: one rounding step apart.
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0, atol=2 * torch.finfo(dtype).eps * scale)


def test_gradients_match_diffusers():
    attn = _sana_self_attention()
    hidden_states = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for processor in (SanaLinearAttnProcessor2_0(), TokenMajorLinearAttnProcessor()):
        attn.set_processor(processor)
        attn.zero_grad()
        attn(hidden_states).square().sum().backward()
        grads.append([p.grad.clone() for p in attn.parameters()])
    for reference, ours in zip(*grads):
        torch.testing.assert_close(ours, reference)


def test_only_sana_linear_self_attention_is_switched(pipe):
    blocks = pipe.model.dit.transformer.transformer_blocks
    assert all(isinstance(block.attn1.processor, TokenMajorLinearAttnProcessor) for block in blocks)
    assert not any(TokenMajorLinearAttnProcessor.supports(block.attn2) for block in blocks if block.attn2 is not None)
    softmax_attention = Attention(query_dim=64, heads=4, dim_head=16)
    assert use_token_major_linear_attention([softmax_attention]) == 0
