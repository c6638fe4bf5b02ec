"""Qwen2.5-VL's vision patch embedding run as the matrix product it is.

transformers' ``Qwen2_5_VisionPatchEmbed`` reshapes each flattened patch to ``[C, T, P, P]`` and runs
a ``Conv3d`` whose kernel equals its stride, one output per patch: a linear map of the flattened
patch. On the CPU that convolution takes oneDNN's generic path: 146-244 ms in bfloat16 (72 ms in
float32) for the 1296 patches of one 512x512 image on 2 threads, against 1.6-2.4 ms (10 ms) as
``F.linear`` on the same weight. Same module names and weights (checkpoint keys load unchanged);
the result equals the convolution's within float rounding (the sums run in another order).
"""
from __future__ import annotations

import torch
from torch import nn

from .layer_offload import built_class, tensors_on
from .onednn_linear import linear


class LinearPatchEmbed(nn.Module):
    """``Qwen2_5_VisionPatchEmbed`` on the same ``proj`` weight, its kernel-sized Conv3d as ``F.linear``."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.proj = source.proj  # Conv3d C -> embed_dim, kernel = stride = (T, P, P), no bias
        self.embed_dim = source.embed_dim
        self.patch_shape = (source.in_channels, *source.proj.kernel_size)  # (C, T, P, P)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether ``module`` is a patch embedding this rewrite computes exactly (Qwen2.5-VL's setting)."""
        proj = getattr(module, "proj", None)
        return (type(module).__name__ == "Qwen2_5_VisionPatchEmbed" and type(proj) is nn.Conv3d
                and proj.kernel_size == proj.stride and proj.padding == (0, 0, 0) and proj.groups == 1
                and proj.dilation == (1, 1, 1) and proj.bias is None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Patches [N, C * T * P * P] (or any shape holding them) -> [N, embed_dim]."""
        if built_class(self.proj) is not nn.Conv3d:  # something wraps the convolution: run it as itself
            patches = hidden_states.reshape(-1, *self.patch_shape)
            return self.proj(patches.to(next(self.proj.parameters()).dtype)).reshape(-1, self.embed_dim)
        with tensors_on(self.proj, hidden_states.device):  # its weight may be streamed (layer_offload)
            weight = self.proj.weight  # [embed_dim, C, T, P, P]
            patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)  # [N, C * T * P * P]
            return linear(patches, weight.flatten(1))


def use_linear_patch_embed(visual: nn.Module) -> bool:
    """Swap the vision tower's patch embedding for ``LinearPatchEmbed`` (same weight) -> whether it was swapped."""
    if not LinearPatchEmbed.supports(getattr(visual, "patch_embed", None)):
        return False
    visual.patch_embed = LinearPatchEmbed(visual.patch_embed)
    return True
