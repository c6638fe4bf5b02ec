"""GGML block formats Q8_0, Q5_K and Q4_K in torch, and ``GGUFLinear``, which dequantises per call.

Layouts (llama.cpp ``ggml-common.h``; the ``gguf`` package's ``gguf.quants.dequantize`` is the
reference the tests compare against). Rows are cut into blocks along the input dimension:

* Q8_0, 32 values / 34 bytes: f16 ``d``, 32 x int8 ``q``; ``x = d * q``.
* Q4_K, 256 values / 144 bytes: f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit sub-block scales and mins
  (8 sub-blocks of 32), 128 bytes of 4-bit ``q``; ``x = d * sc * q - dmin * m``.
* Q5_K, 256 values / 176 bytes: as Q4_K plus 32 bytes holding each value's fifth bit.

The ``gguf`` package (0.19) quantises only Q8_0 among these, so quantising is done here too. This
module needs torch only; the ``gguf`` package is needed for reading and writing ``.gguf`` files.
Rows whose length is not a multiple of the block are zero-padded (``GGUFLinear`` slices the padding
off), so a 2240-wide SANA layer can still be stored as Q4_K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .row_blocks import convert_rows


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_values: int
    block_bytes: int


Q8_0 = BlockFormat("q8_0", 8, 32, 34)
Q4_K = BlockFormat("q4_k", 12, 256, 144)
Q5_K = BlockFormat("q5_k", 13, 256, 176)
BLOCK_FORMATS = {f.name: f for f in (Q8_0, Q4_K, Q5_K)}
FORMAT_BY_GGML_TYPE = {f.ggml_type: f for f in BLOCK_FORMATS.values()}
SUB_BLOCK = 32  # K-quants: 8 sub-blocks of 32 values per 256-value block


def padded_width(in_features: int, fmt: BlockFormat) -> int:
    return -(-in_features // fmt.block_values) * fmt.block_values


def row_bytes(in_features: int, fmt: BlockFormat) -> int:
    return padded_width(in_features, fmt) // fmt.block_values * fmt.block_bytes


# -- quantising ------------------------------------------------------------------------------
def quantize_blocks(weight: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """``weight`` [out, in] -> raw bytes uint8 [out, row_bytes(in)] (rows zero-padded to whole blocks)."""
    out_features, in_features = weight.shape
    weight = F.pad(weight.detach().float(), (0, padded_width(in_features, fmt) - in_features))
    blocks = weight.reshape(-1, fmt.block_values)  # [n_blocks, block_values]
    packed = _QUANTIZERS[fmt.name](blocks)
    return packed.reshape(out_features, -1)


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).reshape(-1, 1).view(torch.uint8)  # [n, 2]


def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (blocks * inverse[:, None]).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1)


def _k_scales(blocks: torch.Tensor, levels: int):
    """Per sub-block scale and min of ``x ~ sc*d * q - m*dmin`` with q in [0, levels] and 6-bit sc, m.

    Returns (d [n], dmin [n], sc [n, 8] uint8, m [n, 8] uint8, q [n, 256] uint8). A plain min/max
    fit (llama.cpp searches a little further for a lower error; the format is the same).
    """
    sub = blocks.reshape(-1, 8, SUB_BLOCK)
    low = sub.amin(dim=2).clamp(max=0)  # the offset is subtracted, so the min is <= 0
    step = (sub.amax(dim=2) - low) / levels  # [n, 8]
    offset = -low
    d = step.amax(dim=1) / 63
    dmin = offset.amax(dim=1) / 63
    d16, dmin16 = d.to(torch.float16).float(), dmin.to(torch.float16).float()
    sc = torch.where(d16[:, None] > 0, step / d16[:, None].clamp(min=1e-30), 0).round().clamp(0, 63)
    m = torch.where(dmin16[:, None] > 0, offset / dmin16[:, None].clamp(min=1e-30), 0).round().clamp(0, 63)
    eff_step = (d16[:, None] * sc)[..., None]  # [n, 8, 1]
    eff_offset = (dmin16[:, None] * m)[..., None]
    q = torch.where(eff_step > 0, (sub + eff_offset) / eff_step.clamp(min=1e-30), 0).round().clamp(0, levels)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8).reshape(-1, 256)


def _pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> 12 bytes (the inverse of llama.cpp's ``get_scale_min_k4``)."""
    packed = torch.empty(sc.shape[0], 12, dtype=torch.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return packed


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [n, 256] (low 4 bits used) -> [n, 128]: each 64-value chunk is 32 bytes, low nibble first."""
    chunks = (q & 0x0F).reshape(-1, 4, 2, SUB_BLOCK)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def _quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = _k_scales(blocks, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), _pack_nibbles(q)], dim=1)


def _quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = _k_scales(blocks, 31)
    high = (q >> 4).reshape(-1, 8, SUB_BLOCK)  # bit i of byte l: the fifth bit of value l of sub-block i
    qh = torch.zeros(q.shape[0], SUB_BLOCK, dtype=torch.uint8)
    for i in range(8):
        qh |= high[:, i] << i
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qh, _pack_nibbles(q)], dim=1)


_QUANTIZERS = {"q8_0": _quantize_q8_0, "q4_k": _quantize_q4_k, "q5_k": _quantize_q5_k}


# -- dequantising ------------------------------------------------------------------------------
def dequantize_blocks(data: torch.Tensor, fmt: BlockFormat, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw bytes uint8 [out, row_bytes] -> [out, in_features] in ``dtype`` (padding dropped), by row blocks."""
    dequantize = _DEQUANTIZERS[fmt.name]
    out = torch.empty(data.shape[0], in_features, dtype=dtype, device=data.device)
    return convert_rows(data, out, lambda rows: dequantize(rows.reshape(-1, fmt.block_bytes), dtype)
                        .reshape(rows.shape[0], -1)[:, :in_features])


def _f16(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).to(dtype)  # [n, 1]


def _dequantize_q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks[:, :2], dtype)
    return d * blocks[:, 2:].contiguous().view(torch.int8).to(dtype)


def _unpack_k_scales(packed: torch.Tensor):
    sc = torch.cat([packed[:, 0:4] & 0x3F, (packed[:, 8:12] & 0x0F) | ((packed[:, 0:4] >> 2) & 0x30)], dim=1)
    m = torch.cat([packed[:, 4:8] & 0x3F, (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 2) & 0x30)], dim=1)
    return sc, m  # [n, 8] each


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)  # where the blocks are
    chunks = qs.reshape(-1, 4, 1, SUB_BLOCK) >> shifts
    return (chunks & 0x0F).reshape(-1, 8, SUB_BLOCK)


def _k_values(blocks: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d, dmin = _f16(blocks[:, 0:2], dtype), _f16(blocks[:, 2:4], dtype)
    sc, m = _unpack_k_scales(blocks[:, 4:16])
    step = (d * sc.to(dtype))[..., None]  # [n, 8, 1]
    offset = (dmin * m.to(dtype))[..., None]
    return (step * q.to(dtype) - offset).reshape(-1, 256)


def _dequantize_q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _k_values(blocks, _unpack_nibbles(blocks[:, 16:144]), dtype)


def _dequantize_q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    qh = blocks[:, 16:48].reshape(-1, 1, SUB_BLOCK) >> bits
    q = _unpack_nibbles(blocks[:, 48:176]) | ((qh & 0x01) << 4)
    return _k_values(blocks, q, dtype)


_DEQUANTIZERS = {"q8_0": _dequantize_q8_0, "q4_k": _dequantize_q4_k, "q5_k": _dequantize_q5_k}


class GGUFLinear(torch.nn.Module):
    """A drop-in ``nn.Linear`` holding GGML blocks (uint8 [out, row_bytes]); dequantised per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: BlockFormat, device=None,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        # A buffer, not a parameter: ``module.to(dtype)`` leaves integer tensors alone.
        self.register_buffer("weight", torch.empty(out_features, row_bytes(in_features, fmt), dtype=torch.uint8,
                                                   device=device))
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.format, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format.name}")
