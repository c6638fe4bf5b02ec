"""Input-major storage of the DiT's float32 linear weights: the CPU's matrix products read them straight.

``nn.Linear`` keeps its weight ``[out, in]`` row-major and computes ``x @ weight.T``, so MKL's sgemm
reads the weight transposed. At the DiT's token counts (the medium model: 64 tokens x 2-3 guidance
rows) the weight is most of what a product reads, and packing it from the transposed layout costs:
measured on one CPU thread, ``[128, 640] @ [640, 640]`` 0.70 -> 0.63 ms, ``[128, 640] @ [640, 3200]``
3.36 -> 3.02 ms, ``[128, 1600] @ [1600, 640]`` 1.67 -> 1.54 ms with the weight stored ``[in, out]``.

So the loader stores these weights input-major (``CheckpointFiles.load_component(input_major=...)``
transposes them on the way in): each stays an ``[out, in]`` parameter (same module, shape,
state-dict key and values) whose memory is ``[in, out]``, so ``weight.T`` is a plain row-major
matrix. Products give the same numbers up to float rounding. Moving the model keeps the layout
(``Tensor.to`` preserves strides). Only float32 on the CPU: bfloat16 products run through oneDNN
(AMX), which is not faster this way, and GPUs' BLAS take either layout at full speed. Where float32
products run through oneDNN too (``onednn_linear``), the layout gives the same bits and is as fast or
a little faster (AMD EPYC, one thread: 94-105 against 93-97 GFLOP/s row-major).
"""
from __future__ import annotations

import torch
from torch import nn

from .mix_ffn import TokenMajorGLUMBConv


def input_major_keys(transformer: nn.Module) -> frozenset[str]:
    """State-dict keys of the weights that run as ``F.linear``: the linears, and the 1x1 convolutions
    of the Mix-FFNs the token-major rewrite takes or took (``mix_ffn.pointwise``)."""
    keys = {f"{name}.weight" for name, module in transformer.named_modules() if isinstance(module, nn.Linear)}
    for name, module in transformer.named_modules():
        if TokenMajorGLUMBConv.supports(module) or isinstance(module, TokenMajorGLUMBConv):
            keys |= {f"{name}.conv_inverted.weight", f"{name}.conv_point.weight"}
    return frozenset(keys)


def is_input_major(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in, ...] lies in memory as [in, out] (its transpose is contiguous)."""
    return weight.flatten(1).t().is_contiguous()


def use_row_major_weights(module: nn.Module) -> int:
    """Store every parameter of ``module`` row-major again, in place -> how many were re-stored.

    For training: FSDP shards flat views of the parameters, and optimizer moments take their
    parameter's layout (safetensors saves row-major tensors only).
    """
    count = 0
    for param in module.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
            count += 1
    return count
