"""Projections of the DiT and the DC-AE never run on strided views (slow bf16 path on the CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tbac_core.modeling.contiguous import contiguous_input, make_inputs_contiguous


def test_contiguous_input_hook_is_added_once_and_changes_no_result():
    layer = nn.Linear(8, 4)
    strided = torch.randn(2, 8, 5).transpose(1, 2)  # [2, 5, 8], a transposed view
    expected = layer(strided)
    assert make_inputs_contiguous([layer]) == 1
    assert make_inputs_contiguous([layer]) == 0  # already there
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))  # runs after ours
    assert torch.equal(layer(strided), expected)
    assert seen == [True]
    assert contiguous_input(layer, (strided, "rest"))[0].is_contiguous()
    assert contiguous_input(layer, (strided, "rest"))[1] == "rest"


def test_no_dit_or_vae_projection_reads_a_strided_input(pipe, monkeypatch):
    model = pipe.model
    weights = {p.data_ptr() for module in (model.dit, model.vae) for p in module.parameters()}
    strided = []
    plain_linear = F.linear

    def recording_linear(x, weight, bias=None):
        if weight.data_ptr() in weights and not x.is_contiguous():
            strided.append((tuple(x.shape), x.stride()))
        return plain_linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", recording_linear)
    with torch.no_grad():
        pipe.generate("a red cat", steps=2, seed=0, width=64, height=64)
        pipe.edit("make it blue", images=[Image.new("RGB", (64, 64), (9, 99, 199))], steps=2, seed=0)
        pipe.encode_image(torch.rand(1, 64, 64, 3))
    assert strided == []
