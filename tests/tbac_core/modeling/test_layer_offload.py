"""Offloadable layers: a part whose layers move their weights per call computes what the part computes in place.

There is no second device on a CPU machine, so two stand-ins: layers *flagged* offloaded take the
moving path with both devices the CPU (bit-identical results), and the ``meta`` device plays the
GPU: with the resident tensors on ``meta`` and every layer's weights left on the CPU, a forward on
``meta`` inputs under ``SameDevice`` (every torch call must see its tensors on one device; meta
kernels alone do not check that for linear, conv or embedding) only runs if every layer moves its
weights to its input's device.
"""
from __future__ import annotations

import pytest
import torch
from streamed_layers import stream
from torch.overrides import TorchFunctionMode

from tbac_core import load_model
from tbac_core.modeling.layer_offload import (
    OffloadableLayer,
    built_class,
    make_layers_offloadable,
    offloadable_layers,
    place_resident,
    resident_tensors,
    tensor_bytes,
)
from tbac_core.modeling.mllm import text_model
from tbac_core.params import SamplingParams
from tbac_core.pipeline import TBACPipeline

PARTS = ("mllm", "dit", "vae")
META = torch.device("meta")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class SameDevice(TorchFunctionMode):
    """Fails any torch call that gets tensors on two devices (0-dim tensors aside, as torch allows)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in _tensors((args, kwargs)) if t.dim() > 0}
        if len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__name__', func)} got tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def outputs(pipe: TBACPipeline) -> dict:
    cond = pipe.encode("a red cat on a blue chair")
    latents = pipe.sample(cond, width=64, height=64, params=SamplingParams(steps=1, guidance_scale=4.5, seed=3))
    return {"encode": torch.cat([cond.sources[0].positive, cond.sources[0].negative]), "step": latents,
            "decode": pipe.decode(latents)}


@pytest.mark.parametrize("quantization", [None, "q4_k"])  # fp8 moves the same way: see the meta test
def test_streamed_layers_give_bit_identical_encode_step_and_decode(checkpoint_dir, quantization):
    model = load_model(checkpoint_dir, device="cpu", dtype="float32", quantization=quantization)
    reference = outputs(TBACPipeline(model, device="cpu", cache_size=0))
    flagged = 0
    for part in PARTS:
        for layer in make_layers_offloadable(getattr(model, part)):
            layer.weights_offloaded = True
            flagged += 1
    quantized = [layer for part in PARTS for layer in offloadable_layers(getattr(model, part))
                 if type(layer).__name__ in ("FP8Linear", "GGUFLinear")]
    assert bool(quantized) == (quantization is not None)
    streamed = outputs(TBACPipeline(model, device="cpu", cache_size=0))
    assert flagged > 150
    for key in reference:
        torch.testing.assert_close(streamed[key], reference[key], atol=0, rtol=0, msg=key)


@pytest.fixture(scope="module")
def meta_model(checkpoint_dir, request):
    """The tiny model with every layer offloadable, its weights on the CPU and its resident tensors on meta."""
    model = load_model(checkpoint_dir, device="cpu", dtype="float32", quantization=request.param)
    for part in PARTS:
        make_layers_offloadable(getattr(model, part))
        place_resident(getattr(model, part), META)
    return model


@pytest.mark.parametrize("meta_model", [None, "fp8", "q4_k", "q5_k", "q8_0"], indirect=True)
def test_every_layer_moves_its_weights_to_its_inputs_device(meta_model):
    with SameDevice():
        run_on_meta(meta_model)


class _AutocastOffOnMeta(torch.autocast):
    """transformers 4.50's rotary embedding opens ``torch.autocast(device_type=<input device>, enabled=False)``,
    which torch refuses for ``meta``; on a real GPU it is "cuda". Disabled autocast is a no-op, so the
    stand-in device gets the CPU's (the device checks of ``SameDevice`` are unaffected)."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@pytest.fixture(autouse=True)
def autocast_accepts_meta(monkeypatch):
    monkeypatch.setattr(torch, "autocast", _AutocastOffOnMeta)


def run_on_meta(model):
    assert all(p.device.type == "cpu" for layer in offloadable_layers(model.mllm) for p in layer.parameters())
    conditions = [torch.zeros(1, 4, model.dit.connector[0].in_features, device=META)] * model.dit.num_blocks
    blocks = [model.dit.embed_condition(states) for states in conditions]
    latents = torch.zeros(1, model.latent_channels, 2, 2, device=META)
    velocity = model.dit(latents, torch.ones(1, device=META), model.dit.precompute_conditions(blocks))
    assert velocity.device == META and velocity.shape == latents.shape
    side = 2 * model.vae_scale_factor
    assert model.vae.decode(latents).sample.shape == (1, 3, side, side)
    ids = torch.zeros(1, 5, dtype=torch.long, device=META)
    hidden = text_model(model.mllm)(inputs_embeds=model.mllm.get_input_embeddings()(ids),
                                    position_ids=torch.zeros(3, 1, 5, dtype=torch.long, device=META),
                                    use_cache=False).last_hidden_state
    assert model.mllm.lm_head(hidden).shape == (1, 5, model.base_vocab)  # reads the (CPU) embedding
    assert model.mllm.device == META  # the first layer is resident: frameworks read the device from it


@pytest.mark.parametrize("meta_model", [None], indirect=True)
@pytest.mark.parametrize("part, kind", [("dit", torch.nn.Conv2d), ("mllm", torch.nn.Embedding),
                                        ("mllm", torch.nn.Linear), ("vae", torch.nn.Conv2d), ("vae", "LeanRMSNorm")])
def test_a_plain_layer_left_on_the_cpu_fails_on_meta_inputs(meta_model, part, kind):
    """The control of the test above: one layer without the moving forward makes the same run fail."""
    root = {"mllm": text_model(meta_model.mllm), "dit": meta_model.dit, "vae": meta_model.vae.decoder}[part]
    layer = next(layer for layer in offloadable_layers(root)
                 if (type(layer).__name__ == kind if isinstance(kind, str) else isinstance(layer, kind)))
    offloadable = type(layer)
    layer.__class__ = built_class(layer)  # the original class, without the moving forward
    try:
        with SameDevice(), pytest.raises(AssertionError, match="got tensors on"):
            run_on_meta(meta_model)
    finally:
        layer.__class__ = offloadable


def test_a_moved_call_puts_back_the_layers_own_tensors_even_when_it_fails(checkpoint_dir):
    model = load_model(checkpoint_dir, device="cpu", dtype="float32")
    linear = next(layer for layer in make_layers_offloadable(model.dit) if isinstance(layer, torch.nn.Linear))
    before = dict(linear._parameters)
    with pytest.raises(RuntimeError):
        linear(torch.zeros(2, linear.in_features + 1, device=META))  # the shapes do not match
    assert linear(torch.zeros(2, linear.in_features, device=META)).device == META
    assert linear._parameters == before and all(p.device.type == "cpu" for p in linear.parameters())


def test_resident_tensors_are_the_first_layer_and_what_lies_outside_layers(checkpoint_dir):
    model = load_model(checkpoint_dir, device="cpu", dtype="float32")
    for part in PARTS:
        module = getattr(model, part)
        total = sum(t.nbytes for t in module.state_dict().values())
        layers = make_layers_offloadable(module)
        assert make_layers_offloadable(module) == layers  # idempotent
        assert all(isinstance(layer, OffloadableLayer) and type(layer).__name__ == type(layer).__mro__[2].__name__
                   for layer in layers)
        resident = resident_tensors(module)
        first = next(module.parameters())
        assert any(getattr(owner, kind)[name] is first for owner, kind, name in resident)
        persistent = sum(getattr(owner, kind)[name].nbytes for owner, kind, name in resident
                         if kind == "_parameters" or name not in owner._non_persistent_buffers_set)
        assert sum(tensor_bytes(layer) for layer in layers) + persistent == total
        assert place_resident(module, META) == sum(getattr(o, k)[n].nbytes for o, k, n in resident)
        on_meta = {id(getattr(o, k)[n]) for o, k, n in resident_tensors(module)}
        for tensor in module.state_dict(keep_vars=True).values():
            assert (tensor.device == META) == (id(tensor) in on_meta)


def _streamed_linear():
    return stream(torch.nn.Linear(3, 2))


def test_a_streamed_layer_applies_the_per_call_weight_patches_to_its_copies():
    """ComfyUI's partial load hands a LoRA on an offloaded layer over as ``weight_function`` / ``bias_function``."""
    layer = _streamed_linear()
    stored_weight, stored_bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight_function = [lambda w: w.add_(1.0), lambda w: w * 2]  # in place first: must hit a copy
    layer.bias_function = [lambda b: b - 0.5]
    x = torch.randn(4, 3)
    with torch.no_grad():
        got = layer(x)
        expected = torch.nn.functional.linear(x, (stored_weight + 1.0) * 2, stored_bias - 0.5)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert torch.equal(layer.weight, stored_weight) and torch.equal(layer.bias, stored_bias)
        layer.weight_function, layer.bias_function = [], []
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, stored_weight, stored_bias), rtol=0, atol=0)


def test_the_fast_paths_see_the_patched_weights_too():
    from tbac_core.modeling.layer_offload import tensors_on

    layer = _streamed_linear()
    layer.weight_function = [lambda w: w * 0]
    with tensors_on(layer, torch.device("cpu")):
        assert torch.equal(layer.weight, torch.zeros_like(layer.weight))
    assert layer.weight.abs().sum() > 0


def test_a_patch_on_a_quantised_layer_is_refused_clearly():
    from tbac_core.errors import InvalidParameterError

    layer = _streamed_linear()
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    layer.weight_function = [lambda w: w]
    with pytest.raises(InvalidParameterError, match="quantised layer"):
        layer(torch.randn(1, 3))


def test_a_loaded_layer_with_per_call_patches_applies_them_too():
    """ComfyUI's weight wrappers reach fully loaded layers as well; its own layers then take the casting path."""
    layer = _streamed_linear()
    layer.weights_offloaded = False  # loaded: nothing to move
    stored = layer.weight.detach().clone()
    x = torch.randn(2, 3)
    with torch.no_grad():
        plain = layer(x)
        layer.weight_function = [lambda w: w * 3]
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, stored * 3, layer.bias), rtol=0, atol=0)
        layer.weight_function = []
        assert torch.equal(layer(x), plain) and torch.equal(layer.weight, stored)
