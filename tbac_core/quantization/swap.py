"""Which weights are quantised, and putting quantised linears in place of ``nn.Linear`` before loading.

Only the ``nn.Linear`` weights of the MLLM's decoder layers and of the DiT's transformer blocks are
quantised: they hold ~all the bytes. The VAE, norms, embeddings, the vision tower, the DiT's patch
and caption embedders and the connector stay in 16/32 bits, because they are small and the images
are sensitive to them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..params import QUANTIZATION_FORMATS
from .fp8 import FP8_DTYPE, SCALE_SUFFIX, FP8Linear, quantize_fp8
from .ggml import BLOCK_FORMATS, BlockFormat, GGUFLinear, quantize_blocks, row_bytes

FORMATS = QUANTIZATION_FORMATS  # "fp8" (FP8Linear) and the GGUF block formats of BLOCK_FORMATS (GGUFLinear)
# Keys relative to the component (the checkpoint prefix stripped), either transformers layout.
_QUANTIZED_KEY = {
    "mllm": re.compile(r"^(model\.)?(language_model\.)?layers\.\d+\.(self_attn|mlp)\.\w+\.weight$"),
    "dit": re.compile(r"^transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$"),
}


def is_quantizable(component: str, key: str, shape) -> bool:
    pattern = _QUANTIZED_KEY.get(component)
    return pattern is not None and len(shape) == 2 and bool(pattern.match(key))


@dataclass
class BlockQuantizedWeight:
    """A GGML-quantised weight as read from a file: raw blocks and the logical [out, in] shape."""

    data: torch.Tensor  # uint8 [out, row_bytes]
    format: BlockFormat
    shape: tuple[int, int]


def quantize_state(component: str, state: dict, fmt: str) -> dict:
    """Quantise the selected weights of one component's state dict (keys without the checkpoint prefix)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = {}
    for key, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != FP8_DTYPE
                and is_quantizable(component, key, tensor.shape)):
            out[key] = tensor
        elif fmt == "fp8":
            out[key], scale = quantize_fp8(tensor)
            out[key[: -len("weight")] + SCALE_SUFFIX] = scale
        else:
            block_format = BLOCK_FORMATS[fmt]
            out[key] = BlockQuantizedWeight(quantize_blocks(tensor, block_format), block_format, tuple(tensor.shape))
    return out


def swap_linears(module: torch.nn.Module, state: dict, source: str, rename=None) -> int:
    """Replace each ``nn.Linear`` whose weight in ``state`` is quantised by an ``FP8Linear``/``GGUFLinear``.

    Runs on the meta-device module before ``load_strict``; afterwards the state's entries have the
    quantised layers' shapes (``BlockQuantizedWeight`` becomes its raw bytes). ``rename`` maps state
    keys and module names to a common layout (the two transformers layouts). Returns how many.
    Every layer is checked before the first is swapped: a refused file leaves ``module`` and ``state``
    as they were.
    """
    rename = rename or (lambda key: key)
    by_name = {rename(key): key for key in state}
    plan = []  # (module name, new layer, state key, new state value): every layer checked before the first swap
    for name, child in list(module.named_modules()):
        state_key = by_name.get(rename(f"{name}.weight"))
        value = state.get(state_key) if state_key else None
        quantized = isinstance(value, BlockQuantizedWeight) or (
            isinstance(value, torch.Tensor) and value.dtype == FP8_DTYPE)
        if not quantized:
            continue
        if not isinstance(child, torch.nn.Linear):
            raise CheckpointError(f"{source}: tensor {state_key} is quantised, but the model's {name} is a "
                                  f"{type(child).__name__}; only linear layers can be. The file is not for this model.")
        expected = (child.out_features, child.in_features)
        given = value.shape if isinstance(value, BlockQuantizedWeight) else tuple(value.shape)
        if tuple(given) != expected:
            raise CheckpointError(f"{source}: tensor {state_key} has shape {tuple(given)}, the model's {name} "
                                  f"needs {expected}. The file belongs to another model (or config).")
        bias = child.bias is not None
        if isinstance(value, BlockQuantizedWeight):
            if tuple(value.data.shape) != (expected[0], row_bytes(expected[1], value.format)):
                raise CheckpointError(f"{source}: tensor {state_key} holds {tuple(value.data.shape)} bytes of "
                                      f"{value.format.name} blocks; {expected} needs "
                                      f"{(expected[0], row_bytes(expected[1], value.format))}. The file is corrupt.")
            layer = GGUFLinear(child.in_features, child.out_features, bias, value.format, device="meta")
            plan.append((name, layer, state_key, value.data))
        else:
            scale_key = state_key[: -len("weight")] + SCALE_SUFFIX
            layer = FP8Linear(child.in_features, child.out_features, bias, scaled=scale_key in state, device="meta")
            plan.append((name, layer, state_key, value))
    for name, layer, state_key, value in plan:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
        state[state_key] = value
    return len(plan)
