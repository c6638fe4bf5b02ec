"""fp8 weights (``float8_e4m3fn``, the format ComfyUI users share) computed in the input's dtype.

A weight is stored as ``weight / scale`` in fp8 with one float32 ``scale_weight`` per tensor
(ComfyUI's "fp8 scaled" naming), or without a scale (plain fp8: values beyond +-448 saturate).
Each call upcasts the whole weight to the input's dtype: the weight costs 1 byte per element at rest
and its compute-dtype copy lives for one matmul only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_SUFFIX = "scale_weight"
QUANTIZE_CHUNK_ELEMENTS = 1 << 20  # rows converted together by quantize_fp8 (4 MiB of float32 work copy)


def quantize_fp8(weight: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` [out, in] -> (fp8 [out, in], float32 scalar scale or None).

    Scaled: the largest magnitude maps to 448, so the whole e4m3 range is used (3 mantissa bits: a
    relative rounding error of at most 2^-4 per element for normal values). Converted a block of
    rows at a time: float32 work copies of the whole weight (3 of them, once a bf16 weight is cast)
    left heap holes that grew the quantising process by most of the checkpoint (measured).
    """
    weight = weight.detach()
    out = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scale = None
    if scaled:
        low, high = torch.aminmax(weight)
        amax = torch.maximum(low.abs(), high.abs()).float()
        scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight[0].numel())) if weight.dim() else 1
    for source, target in zip(weight.split(rows), out.split(rows)):
        values = source.float() if scale is None else source.float() / scale
        target.copy_(values.clamp_(-FP8_MAX, FP8_MAX))
    return out, None if scale is None else scale.reshape(())


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return weight.to(dtype)
    return (weight.to(torch.float32) * scale).to(dtype) if dtype != torch.float32 else weight.float() * scale


class FP8Linear(torch.nn.Module):
    """A drop-in ``nn.Linear`` whose weight is fp8; ``forward`` computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scaled: bool, device=None,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        if scaled:
            self.register_buffer(SCALE_SUFFIX, torch.empty((), dtype=torch.float32, device=device))
        else:
            self.scale_weight = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)`` casts every floating-point tensor, fp8 included; cast the weight back
        # (exact: bf16, fp16 and fp32 all hold every e4m3 value) so it stays 1 byte per element.
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight.data = self.weight.data.to(FP8_DTYPE)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scaled={self.scale_weight is not None}")
