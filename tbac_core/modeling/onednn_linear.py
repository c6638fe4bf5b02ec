"""Float32 linear layers on the CPU run through oneDNN's matrix product instead of MKL's sgemm.

PyTorch hands a float32 ``F.linear`` on the CPU to MKL's sgemm (bfloat16 goes to oneDNN already).
On an AMD EPYC (Zen 4, AVX-512, no AMX), one thread, oneDNN's product is faster on this model's
shapes with its input-major weights (``weight_layout``): ``[128, 640] x [640, 3200]`` 83 -> 100
GFLOP/s, ``[128, 1600] x [1600, 640]`` 80 -> 101, ``[181, 1536] x [1536, 768]`` (an MLLM encode)
77 -> 100; 1.26-1.5x with 2 threads. A medium generation with a new prompt went 4.03 -> 3.71 s
and 4.47 -> 3.98 s in two runs (-8 %, -11 %; ``bench/linear_bench.py``; bench/MEASUREMENTS.md, 2026-12-08). MKL is Intel's library, and on
an Intel Xeon its sgemm was measured as fast as oneDNN's (2026-12-07). The values are the same
within float rounding (the sums run in another order; that generation's latents within 1e-5), and
oneDNN gives the same bits for either weight layout.

Only where it pays and is safe, else ``F.linear`` as before:

* float32 input and weight on the CPU, the weight a plain strided tensor (not a quantised subclass);
* no gradient to track (inference, or nothing involved requires one): torch defines no backward
  for oneDNN's op, so training keeps ``F.linear``;
* not while ``torch.compile`` traces: the compiler picks its own kernels;
* at least ``MIN_MULTIPLY_ADDS`` (rows x in x out): a oneDNN call costs ~15-20 us more than MKL's,
  which small products feel (a ``[16, 512] x [512, 512]`` runs at 0.74x, ``[128, 64] x [64, 64]`` at
  0.36x, the timestep embedding's one row at 0.83-0.94x); from about 8 M multiply-adds on, oneDNN is
  as fast or faster (``[64, 384] x [384, 384]`` 1.01x, ``[16, 768] x [768, 768]`` 1.29x).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

MIN_MULTIPLY_ADDS = 8_000_000


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear op (x86 and arm64 CPU builds do) and it computes."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = _onednn_linear(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (2, 4) and bool((out == 3).all())


def _onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def takes_onednn(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` runs this product through oneDNN (the rules in this module's docstring)."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided
           or type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if weight.dim() != 2 or input.dim() < 2 or input.numel() * weight.shape[0] < MIN_MULTIPLY_ADDS:
        return False
    return not _compiling() and onednn_linear_available()


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)``: [..., in] x [out, in] -> [..., out], through oneDNN where it pays."""
    if takes_onednn(input, weight, bias):
        return _onednn_linear(input, weight, bias)
    return F.linear(input, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products run through ``linear`` (same parameters, same keys)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, enabled: bool = True) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``OneDNNLinear`` in place (or back, ``enabled=False``,
    for A/B runs) -> how many changed. Other linear layers (quantised ones, LoRA wrappers, offloadable
    forms) keep their class."""
    source, target = (nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            changed += 1
    return changed
