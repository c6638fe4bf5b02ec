"""SANA's ReLU linear self-attention computed on the token-major layout its projections produce.

diffusers' ``SanaLinearAttnProcessor2_0`` turns the ``[B, N, heads * d]`` projections into
channel-major ``[B, heads, d, N]`` views, applies ReLU to those strided views, pads the values with
a row of ones (the normaliser) by copying them, and hands the output projection a transposed view
that must be copied again. ``TokenMajorLinearAttnProcessor`` does the same products on
``[B, heads, N, d]`` views instead: ReLU runs on the contiguous projections, the ones column is
concatenated once, and the output leaves in token order. The same matrix products (transposed), in
float32 as diffusers does them: equal within float rounding, and on the DiT's own shapes the same
bits on this project's CPU (a 20-step medium generation, float32 and bfloat16). About 1 % faster:
one DiT call (``bench/attention_bench.py``) 0.0-0.7 % on the medium model in float32, 1.5 % on the
real architecture in bf16 at 512x512; 20-step medium sampling A/Bs 1.2-1.9 %.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TokenMajorLinearAttnProcessor:
    """``SanaLinearAttnProcessor2_0`` on token-major views; same modules, same weights."""

    @staticmethod
    def supports(attn) -> bool:
        """Whether ``attn`` is a self-attention that runs diffusers' SANA linear-attention processor."""
        return (type(attn.processor).__name__ == "SanaLinearAttnProcessor2_0" and attn.norm_q is None
                and attn.norm_k is None and not attn.is_cross_attention)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        original_dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        query = F.relu(attn.to_q(hidden_states)).float().view(batch, length, heads, -1).transpose(1, 2)  # [B, h, N, d]
        key = F.relu(attn.to_k(encoder_hidden_states)).float()
        key = key.view(batch, -1, heads, key.shape[-1] // heads).permute(0, 2, 3, 1)  # [B, h, d, M]
        value = attn.to_v(encoder_hidden_states).float()
        value = value.view(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)  # [B, h, M, d]
        value = torch.cat([value, value.new_ones(*value.shape[:-1], 1)], dim=-1)  # [B, h, M, d + 1]
        scores = torch.matmul(key, value)  # [B, h, d, d + 1]: the last column sums the keys (normaliser)
        out = torch.matmul(query, scores)  # [B, h, N, d + 1]
        out = out[..., :-1] / (out[..., -1:] + 1e-15)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(original_dtype)  # [B, N, h * d]
        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def use_token_major_linear_attention(attentions) -> int:
    """Give each SANA linear self-attention ``TokenMajorLinearAttnProcessor`` -> how many were switched."""
    switched = 0
    for attn in attentions:
        if TokenMajorLinearAttnProcessor.supports(attn):
            attn.set_processor(TokenMajorLinearAttnProcessor())
            switched += 1
    return switched
