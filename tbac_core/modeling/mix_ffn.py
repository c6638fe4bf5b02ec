"""SANA's Mix-FFN (diffusers' ``GLUMBConv``) with its two 1x1 convolutions run as matrix products.

A SANA block keeps its image tokens as ``[B, L, D]`` and hands the feed-forward a permuted view
``[B, D, H, W]``. ``GLUMBConv`` runs 1x1 ``Conv2d`` layers on it; on the CPU with one thread and
fewer than 16 images PyTorch picks its slow im2col convolution for them (measured: 43 % of a
medium-model step), which also copies the permuted input. A 1x1 convolution is a linear map over
the channels, so here it is ``F.linear`` on the token-major ``[B, H, W, C]`` layout the block already
has; only the 3x3 depthwise convolution stays a convolution. Same weights, same module names
(checkpoint keys load unchanged); the result equals ``GLUMBConv``'s within float rounding (the sums
run in another order), well inside the parity tolerances.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer_offload import built_class, tensors_on
from .onednn_linear import linear


class TokenMajorGLUMBConv(nn.Module):
    """``GLUMBConv`` (no residual, no norm: SANA's setting) on the same weights, 1x1 convs as ``F.linear``."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.conv_inverted = source.conv_inverted  # 1x1: D -> 2 * hidden
        self.conv_depth = source.conv_depth  # 3x3 depthwise over 2 * hidden channels
        self.conv_point = source.conv_point  # 1x1: hidden -> D, no bias
        self.nonlinearity = source.nonlinearity

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether ``module`` is a ``GLUMBConv`` this rewrite computes exactly (SANA's configuration)."""
        return (type(module).__name__ == "GLUMBConv" and not module.residual_connection and module.norm is None
                and module.conv_inverted.kernel_size == (1, 1) and module.conv_point.kernel_size == (1, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W] (a view of token-major [B, H, W, D]) -> [B, D, H, W] (a view of [B, H, W, D])."""
        tokens = hidden_states.permute(0, 2, 3, 1)  # [B, H, W, D]
        expanded = self.nonlinearity(pointwise(self.conv_inverted, tokens))  # [B, H, W, 2 * hidden]
        mixed = self.conv_depth(expanded.permute(0, 3, 1, 2))  # [B, 2 * hidden, H, W], channels-last in memory
        value, gate = torch.chunk(mixed, 2, dim=1)
        gated = (value * self.nonlinearity(gate)).permute(0, 2, 3, 1)  # [B, H, W, hidden]
        return pointwise(self.conv_point, gated).permute(0, 3, 1, 2)  # [B, D, H, W]


def pointwise(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on token-major ``tokens`` [B, H, W, C_in] -> [B, H, W, C_out].

    A plain ``nn.Conv2d`` runs as ``F.linear``, also in its offloadable form (ComfyUI's memory
    manager may stream its weights: ``layer_offload``); anything wrapping it (a LoRA layer on the
    conv) runs as itself, so its extra terms are never skipped.
    """
    if built_class(conv) is nn.Conv2d:
        with tensors_on(conv, tokens.device):
            return linear(tokens, conv.weight.flatten(1), conv.bias)
    return conv(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def use_token_major_ffn(blocks) -> int:
    """Swap each block's ``GLUMBConv`` for ``TokenMajorGLUMBConv`` (same weights) -> how many were swapped."""
    swapped = 0
    for block in blocks:
        if TokenMajorGLUMBConv.supports(block.ff):
            block.ff = TokenMajorGLUMBConv(block.ff)
            swapped += 1
    return swapped
