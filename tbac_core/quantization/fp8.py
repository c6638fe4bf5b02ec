"""fp8 weights (``float8_e4m3fn``, the format ComfyUI users share) computed in the input's dtype.

A weight is stored as ``weight / scale`` in fp8 with one float32 ``scale_weight`` per tensor
(ComfyUI's "fp8 scaled" naming), or without a scale (plain fp8: values beyond +-448 saturate).
Each call upcasts the whole weight to the input's dtype: the weight costs 1 byte per element at rest
and its compute-dtype copy lives for one matmul only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .row_blocks import convert_rows

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_SUFFIX = "scale_weight"


def quantize_fp8(weight: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` [out, in] -> (fp8 [out, in], float32 scalar scale or None).

    Scaled: the largest magnitude maps to 448, so the whole e4m3 range is used (3 mantissa bits: a
    relative rounding error of at most 2^-4 per element for normal values). Converted by row blocks:
    float32 work copies of the whole weight (3 of them, once a bf16 weight is cast) left heap holes
    that grew a quantising process by most of the checkpoint (measured).
    """
    weight = weight.detach()
    out = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    if not scaled:
        return convert_rows(weight, out, lambda rows: rows.float().clamp(-FP8_MAX, FP8_MAX)), None
    low, high = torch.aminmax(weight)
    scale = (torch.maximum(low.abs(), high.abs()).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    convert_rows(weight, out, lambda rows: (rows.float() / scale).clamp_(-FP8_MAX, FP8_MAX))
    return out, scale.reshape(())


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [out, in] (and its scale) -> [out, in] in ``dtype``: ``round(weight * scale)``, by row blocks."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if scale is None:
        return convert_rows(weight, out, lambda rows: rows)  # copy_ converts, exactly (e4m3 fits every dtype)
    return convert_rows(weight, out, lambda rows: rows.to(torch.float32) * scale)


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
