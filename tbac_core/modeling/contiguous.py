"""Contiguous inputs for the projections that diffusers hands strided views.

diffusers' SANA linear attention (the DiT's self-attention) passes its output projection a
transposed view, and the DC-AE's multiscale attention runs its projections on ``movedim`` views of
``[B, C, H, W]`` maps. On CUDA a strided input only changes the GEMM's transpose flags, but on the
CPU a bfloat16 ``F.linear`` on a strided 3-D/4-D input leaves oneDNN's fast path: 28x slower for one
``[2, 64, 2240]`` projection, and 1.58 -> 1.18 s per DiT step of the real architecture at 512x512
(in-process A/B, 2 threads; README: *Speed and memory*). A forward pre-hook
that makes the input contiguous costs one copy of an activation (a no-op when it already is) and
changes no arithmetic: float32 results are bit-identical.
"""
from __future__ import annotations

from torch import nn


def contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input as a contiguous tensor."""
    return (args[0].contiguous(), *args[1:])


def make_inputs_contiguous(modules) -> int:
    """Give each module the ``contiguous_input`` pre-hook (once) -> how many modules got it."""
    added = 0
    for module in modules:
        if contiguous_input not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(contiguous_input)
            added += 1
    return added
