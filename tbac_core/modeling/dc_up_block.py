"""The DC-AE's upsampling blocks: the shortcut added as a view of the input, the upsampling folded into the conv.

diffusers' ``DCUpBlock2d`` adds a shortcut to its convolution's output: the input's channels
repeated (``repeat_interleave``) and then moved to space (``pixel_shuffle``). That makes two copies
of output size and a third for the sum. But each value of the shortcut is one value of the input,
so the shortcut is a strided view of the input, with zero strides where a value repeats. Added in
place to the convolution's output (a new tensor of the block's own), it gives the same sums with
no copy: bit-identical in float32 and bfloat16 (tested). A 512x512 decode of the real DC-AE in
bf16 with 2 threads: 2.33 -> 2.22 s wall, 4.53 -> 4.18 s CPU; the medium model's 256x256 decode
9 % less in float32, 7 % less in bf16 (``bench/decode_bench.py --compare up-blocks``; README).

The SANA DC-AE's decoder upsamples by nearest-neighbour interpolation (x2) and then runs a 3x3
convolution (padding 1) at the output size. Along one axis, output pixel ``2i`` reads the upsampled
pixels ``2i-1, 2i, 2i+1``, which are input pixels ``i-1, i, i``; output ``2i+1`` reads input
``i, i, i+1``. So with the kernel taps ``w0, w1, w2``, output ``2i`` is ``w0 x[i-1] + (w1 + w2) x[i]``
and ``2i+1`` is ``(w0 + w1) x[i] + w2 x[i+1]``: a stride-2 transposed convolution (padding 1) with
the 4-tap kernel ``[w2, w1 + w2, w0 + w1, w0]``, and in 2-D with that fold along both axes
(``folded_upsampling_kernel``). Each output reads 2x2 input pixels instead of 3x3 upsampled ones
(2.25x fewer multiply-adds) and the upsampled copy of the input is never made. The kernel is
folded in float32 at each call (from the live weight, so anything that changes the weight is
seen); the result equals the interpolate-then-convolve one within float rounding (the folded taps
are summed before the products), as accurate against a float64 reference (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer_offload import built_class, tensors_on
from .module_swap import swap_children


class ViewShortcutDCUpBlock(nn.Module):
    """A ``DCUpBlock2d``'s convolution (same name, so checkpoint keys load unchanged) and settings."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.conv = source.conv
        self.interpolate = source.interpolate
        self.interpolation_mode = source.interpolation_mode
        self.shortcut = source.shortcut
        self.factor = source.factor
        self.repeats = source.repeats
        self._source = (source,)  # a tuple: not registered; use_diffusers_up_blocks puts it back

    # Nearest x2 upsampling and the 3x3 conv as one transposed conv (module docstring); False for A/B runs.
    fold_upsampling = True

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return type(module).__name__ == "DCUpBlock2d" and type(module).__module__.startswith("diffusers.")

    @property
    def source(self) -> nn.Module:
        return self._source[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C * repeats / factor^2, H * factor, W * factor], as ``DCUpBlock2d``."""
        x = self.upsampling_conv(hidden_states)  # [B, C_out, H * f, W * f], a new tensor
        if not self.shortcut:
            return x
        shortcut = shortcut_view(hidden_states, self.repeats, self.factor)
        if shortcut is None:  # a channel pattern no view covers: diffusers' copies
            return x + F.pixel_shuffle(hidden_states.repeat_interleave(self.repeats, dim=1), self.factor)
        out = x.view(shortcut.shape)  # only splits x's dimensions: a view in any memory format
        if torch.is_grad_enabled():  # autograd recording: nothing is overwritten
            return (out + shortcut).view(x.shape)
        out.add_(shortcut)
        return x

    def upsampling_conv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block's convolution with its upsampling: [B, C, H, W] -> [B, C_out, H * f, W * f]."""
        if not self.interpolate:
            return F.pixel_shuffle(self.conv(hidden_states), self.factor)
        if self.fold_upsampling and folds_into_transposed_conv(self.conv, self.interpolation_mode, self.factor):
            with tensors_on(self.conv, hidden_states.device):  # its weight may be streamed (layer_offload)
                kernel = folded_upsampling_kernel(self.conv.weight)
                return F.conv_transpose2d(hidden_states, kernel, self.conv.bias, stride=2, padding=1)
        return self.conv(F.interpolate(hidden_states, scale_factor=self.factor, mode=self.interpolation_mode))


def folds_into_transposed_conv(conv: nn.Module, interpolation_mode: str, factor: int) -> bool:
    """Whether nearest x2 upsampling then ``conv`` is the transposed convolution of ``folded_upsampling_kernel``:
    a plain 3x3 ``nn.Conv2d`` (offloadable or not; a wrapped one runs as itself), stride 1, zero padding 1."""
    return (interpolation_mode == "nearest" and factor == 2 and built_class(conv) is nn.Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def folded_upsampling_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight [O, I, 3, 3] -> the [I, O, 4, 4] weight of the stride-2 transposed
    convolution (padding 1) equal to nearest x2 upsampling followed by it (module docstring: why).

    Folded in float32 (each tap a sum of up to four of the weight's), returned in the weight's dtype.
    One matrix product of the [I * O, 9] taps with the 9 -> 16 fold along both axes: the fastest form
    measured (stacked slices or gathers: 4-10x slower). Where TF32 matrix products are enabled on a
    GPU, the fold rounds as the convolution itself does (cuDNN's TF32 default).
    """
    out_channels, in_channels = weight.shape[:2]
    taps = weight.transpose(0, 1).reshape(in_channels * out_channels, 9).float()  # [I * O, 9]
    return (taps @ _FOLD_2D.T.to(taps.device)).view(in_channels, out_channels, 4, 4).to(weight.dtype)


# Along one axis: transposed-conv tap p (0..3) of the 3x3 kernel's taps a (0..2): [w2, w1 + w2, w0 + w1, w0].
_TAP_FOLD = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
_FOLD_2D = torch.kron(_TAP_FOLD, _TAP_FOLD)  # [16, 9]: 2-D tap (p, q) <- (a, b), both axes folded


def shortcut_view(hidden: torch.Tensor, repeats: int, factor: int) -> torch.Tensor | None:
    """``pixel_shuffle(repeat_interleave(hidden, repeats, 1), f)`` as a strided view of ``hidden`` [B, C, H, W]
    whose 7 dimensions split the output's [B, C_out, H*f, W*f] -> that view, or None.

    Output channel ``c`` at sub-pixel ``(i, j)`` reads input channel ``(c * f^2 + i * f + j) // repeats``;
    that index is a sum of strides when ``repeats`` is a multiple of ``f^2``, a divisor of ``f``, or a
    multiple of ``f`` dividing ``f^2`` (the DC-AE's blocks: 2 and 4 with ``f = 2``). Otherwise None.
    """
    f, r = factor, repeats
    if hidden.dim() != 4 or (hidden.shape[1] * r) % (f * f):
        return None
    B, C, H, W = hidden.shape
    c_out = C * r // (f * f)
    sb, sc, sh, sw = hidden.stride()
    if r % (f * f) == 0:  # each input channel feeds r / f^2 whole output channels
        shape = (B, C, r // (f * f), H, f, W, f)
        strides = (sb, sc, 0, sh, 0, sw, 0)
    elif f % r == 0:  # channel c * f^2/r + i * f/r + j // r
        shape = (B, c_out, H, f, W, f // r, r)
        strides = (sb, (f * f // r) * sc, sh, (f // r) * sc, sw, sc, 0)
    elif r % f == 0 and (f * f) % r == 0:  # channel c * f^2/r + i // (r/f)
        shape = (B, c_out, H, f * f // r, r // f, W, f)
        strides = (sb, (f * f // r) * sc, sh, sc, 0, sw, 0)
    else:
        return None
    return hidden.as_strided(shape, strides, hidden.storage_offset())


def use_view_shortcut_up_blocks(model: nn.Module) -> int:
    """Swap every diffusers ``DCUpBlock2d`` inside ``model`` for ``ViewShortcutDCUpBlock`` -> how many."""
    return swap_children(model, ViewShortcutDCUpBlock.supports, ViewShortcutDCUpBlock)


def use_folded_upsampling(model: nn.Module, enabled: bool = True) -> int:
    """Switch the folded upsampling of every ``ViewShortcutDCUpBlock`` in ``model`` on or off (A/B runs) -> how many."""
    blocks = [module for module in model.modules() if isinstance(module, ViewShortcutDCUpBlock)]
    for block in blocks:
        block.fold_upsampling = enabled
    return len(blocks)


def use_diffusers_up_blocks(model: nn.Module) -> int:
    """Undo ``use_view_shortcut_up_blocks`` (for A/B runs) -> how many."""
    return swap_children(model, lambda child: isinstance(child, ViewShortcutDCUpBlock), lambda block: block.source)
