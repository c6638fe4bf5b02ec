"""Float32 CPU linears through oneDNN: the same products as ``F.linear``, taken only where they are safe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbac_core.loading import load_model
from tbac_core.modeling import onednn_linear
from tbac_core.modeling.layer_offload import make_layers_offloadable
from tbac_core.modeling.onednn_linear import MIN_MULTIPLY_ADDS, OneDNNLinear, linear, takes_onednn, use_onednn_linears
from tbac_core.quantization import FP8Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the products that really went through oneDNN's op."""
    calls = []
    real = onednn_linear._onednn_linear

    def counted(input, weight, bias):
        calls.append(tuple(input.shape))
        return real(input, weight, bias)

    monkeypatch.setattr(onednn_linear, "_onednn_linear", counted)
    return calls


def _case(rows=64, features=384, out=352, bias=True, input_major=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(rows + features)
    x = torch.randn(2, rows // 2, features, generator=generator).to(dtype)
    weight = torch.randn(out, features, generator=generator).to(dtype)
    if input_major:
        weight = weight.t().contiguous().t()  # [out, in] stored as [in, out] (weight_layout)
    return x, weight, (torch.randn(out, generator=generator).to(dtype) if bias else None)


def test_this_cpu_build_has_the_op():
    # CI's torch is an x86 CPU build: the fast path must really be exercised there, not skipped.
    assert onednn_linear.onednn_linear_available()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_major", [False, True])
def test_same_products_as_f_linear(onednn_calls, bias, input_major):
    x, weight, b = _case(bias=bias, input_major=input_major)
    out = linear(x, weight, b)
    assert onednn_calls == [tuple(x.shape)]
    reference = F.linear(x.double(), weight.double(), None if b is None else b.double())
    expected = F.linear(x, weight, b)
    assert out.shape == expected.shape and out.dtype == torch.float32
    # Both within float rounding of the float64 product; the sums run in another order.
    assert (out.double() - reference).abs().max() < 1e-4
    assert (expected.double() - reference).abs().max() < 1e-4


def test_a_strided_input_view(onednn_calls):
    x, weight, b = _case()
    view = torch.cat([x, x], dim=-1)[..., ::2]  # non-contiguous [2, 32, 384]
    assert torch.allclose(linear(view, weight, b), F.linear(view, weight, b), atol=1e-4)
    assert len(onednn_calls) == 1


@pytest.mark.parametrize("case", ["bf16", "float64", "small product", "compiling", "unavailable", "weight subclass"])
def test_falls_back_to_f_linear(onednn_calls, monkeypatch, case):
    dtype = {"bf16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    x, weight, b = _case(rows=8 if case == "small product" else 64, dtype=dtype)
    assert (x.numel() * weight.shape[0] < MIN_MULTIPLY_ADDS) == (case == "small product")
    if case == "compiling":
        monkeypatch.setattr(onednn_linear, "_compiling", lambda: True)
    if case == "unavailable":
        monkeypatch.setattr(onednn_linear, "onednn_linear_available", lambda: False)
    if case == "weight subclass":
        class Marked(torch.Tensor):
            pass
        weight = weight.as_subclass(Marked)
    assert not takes_onednn(x, weight, b)
    assert torch.equal(linear(x, weight, b).as_subclass(torch.Tensor), F.linear(x, weight, b).as_subclass(torch.Tensor))
    assert onednn_calls == []


def test_training_keeps_autograd(onednn_calls):
    layer = OneDNNLinear(384, 352)
    x, _, _ = _case()
    x.requires_grad_(True)
    layer(x).square().sum().backward()  # oneDNN's op has no backward: this must be F.linear
    assert onednn_calls == [] and layer.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        layer(x)
    assert len(onednn_calls) == 1  # the same tensors without gradient tracking take the fast path


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # the fp8 weight is uninitialised: NaNs compare unequal


def test_use_onednn_linears_swaps_plain_linears_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.GELU()), FP8Linear(4, 4, bias=False, scaled=False))

    class Custom(nn.Linear):
        pass

    model.append(Custom(4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_onednn_linears(model) == 2
    assert [type(m) for m in (model[0], model[1][0], model[2], model[3])] == [OneDNNLinear, OneDNNLinear, FP8Linear, Custom]
    assert model.state_dict().keys() == state.keys()
    assert all(_same_bytes(v, state[k]) for k, v in model.state_dict().items())
    assert use_onednn_linears(model, enabled=False) == 2 and type(model[0]) is nn.Linear
    assert use_onednn_linears(model, enabled=False) == 0


def test_an_offloadable_onednn_linear_streams_its_weights(onednn_calls):
    # ComfyUI's memory manager makes every layer offloadable (layer_offload): the fast path holds there too.
    anchor, layer = nn.Linear(384, 384), OneDNNLinear(384, 352)
    part = nn.Sequential(anchor, layer).requires_grad_(False)
    make_layers_offloadable(part)
    assert isinstance(layer, OneDNNLinear) and type(layer) is not OneDNNLinear
    x, _, _ = _case()
    resident = layer(x)
    layer.weights_offloaded = True
    with torch.no_grad():
        assert torch.equal(layer(x), resident)
    assert len(onednn_calls) == 2


def test_loaded_model_runs_every_plain_linear_through_it(checkpoint_dir):
    model = load_model(checkpoint_dir, device="cpu", dtype="fp32")
    for part in (model.mllm, model.dit, model.vae):
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is OneDNNLinear for m in linears)
