"""diffusers' ``RMSNorm`` with fewer full-size temporaries: the same bits, less memory traffic.

The DC-AE normalises every feature map over its channels with diffusers' ``RMSNorm``, on a
``movedim`` view. Its forward makes a float32 copy, squares it into a second one, then multiplies
the *input* by the float32 scale (a mixed-dtype product, which on the CPU leaves the vectorised
path) into a third, casts it, and writes two more for the weight and the bias. At the decoder's
top resolution a map is ``[1, 128, H, W]``, so each of those is a fresh buffer of up to 512 MiB
that the operating system zero-fills.

``LeanRMSNorm`` computes the same operations in the same order and rounding (float32 square,
float32 mean over the last dimension, float32 scale, cast to the weight's half dtype, then weight
and bias in that dtype), reusing its own temporaries in place: bit-identical to diffusers' forward
in float32, bfloat16 and float16 (tested); a ``[1, 128, 512, 512]`` bf16 map takes 36 % less time,
the real DC-AE's 512x512 bf16 decode 2-17 % less on the CPU (``bench/decode_bench.py``; README).
With autograd recording it overwrites nothing, so a tensor saved for the backward pass stays intact.
"""
from __future__ import annotations

import torch
from torch import nn

from .module_swap import swap_children

HALF_DTYPES = (torch.float16, torch.bfloat16)


class LeanRMSNorm(nn.Module):
    """A diffusers ``RMSNorm``'s parameters (same names, so checkpoint keys load unchanged)."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.eps = source.eps
        self.weight = source.weight  # None without elementwise_affine
        self.bias = getattr(source, "bias", None)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether ``module`` is diffusers' ``RMSNorm`` on its plain PyTorch path (not the NPU kernel)."""
        if type(module).__name__ != "RMSNorm" or not type(module).__module__.startswith("diffusers."):
            return False
        from diffusers.utils import is_torch_npu_available

        return not is_torch_npu_available()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # With autograd recording, nothing is overwritten (a tensor it saved could be one of ours).
        reuse = not torch.is_grad_enabled()
        states = hidden_states.to(torch.float32)
        variance = states.pow(2).mean(-1, keepdim=True)  # [..., 1]
        scale = torch.rsqrt(variance + self.eps)
        if torch.promote_types(hidden_states.dtype, scale.dtype) == torch.float32:
            # diffusers' mixed-dtype input x scale is this float32 product: here one vectorised op.
            states = _times(states, scale, reuse and states is not hidden_states)
        else:
            states = hidden_states * scale  # a float64 input: diffusers' product is float64
        if self.weight is None:
            return states.to(hidden_states.dtype)
        if self.weight.dtype in HALF_DTYPES:
            states = states.to(self.weight.dtype)
        states = _times(states, self.weight, reuse)
        return states if self.bias is None else _plus(states, self.bias, reuse)


def _fits(states: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``states (op) other`` has the dtype and shape of ``states`` (so it may be written in place)."""
    return (torch.promote_types(states.dtype, other.dtype) == states.dtype
            and torch.broadcast_shapes(states.shape, other.shape) == states.shape)


def _times(states: torch.Tensor, other: torch.Tensor, reuse: bool) -> torch.Tensor:
    return states.mul_(other) if reuse and _fits(states, other) else states * other


def _plus(states: torch.Tensor, other: torch.Tensor, reuse: bool) -> torch.Tensor:
    return states.add_(other) if reuse and _fits(states, other) else states + other


def use_lean_rms_norms(model: nn.Module) -> int:
    """Swap every diffusers ``RMSNorm`` inside ``model`` for ``LeanRMSNorm`` (same parameters) -> how many."""
    return swap_children(model, LeanRMSNorm.supports, LeanRMSNorm)


def use_diffusers_rms_norms(model: nn.Module) -> int:
    """Undo ``use_lean_rms_norms``: diffusers' own ``RMSNorm`` on the same parameters (for A/B runs) -> how many."""
    from diffusers.models.normalization import RMSNorm

    def diffusers_norm(lean: LeanRMSNorm) -> nn.Module:
        plain = RMSNorm(1, eps=lean.eps, elementwise_affine=False)
        plain.weight, plain.bias = lean.weight, lean.bias  # None, or the very same parameters
        return plain

    return swap_children(model, lambda child: isinstance(child, LeanRMSNorm), diffusers_norm)
