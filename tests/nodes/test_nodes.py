"""The ComfyUI nodes without ComfyUI: declarations, loading, each node against the library, cancellation."""
from __future__ import annotations

import importlib.util
import inspect
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from graph_runner import input_specs, make_models_root
from PIL import Image

import nodes
from nodes import comfy_bridge as bridge
from nodes import model_nodes, understand_nodes
from tbac_core.errors import (
    CheckpointError,
    ComponentNotFoundError,
    InvalidParameterError,
)
from tbac_core.ladder.layer_spec import LayerSpecError
from tbac_core.params import SamplingParams
from tbac_core.processing.ui_inputs import crop_to_multiple, split_prompts

ROOT = Path(__file__).resolve().parents[2]
CORE_TYPES = {"IMAGE", "LATENT", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "CONDITIONING", "*"}
STEPS = 3


class Interrupt(BaseException):
    """Stands in for ComfyUI's InterruptProcessingException (also a BaseException)."""


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, fixture_root):
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def model(models_root):
    (loaded,) = model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "none")
    return loaded


def _image_batch(count: int, size=(64, 64), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, size[1], size[0], 3, generator=generator)


# -- declarations ----------------------------------------------------------------------------
ALL_NODES = sorted(nodes.NODE_CLASS_MAPPINGS.items())


@pytest.mark.parametrize("name, cls", ALL_NODES)
def test_declared_inputs_match_the_function(name, cls, models_root):
    function = getattr(cls, cls.FUNCTION)
    params = inspect.signature(function).parameters
    names = [p for p in params if p != "self"]
    specs = input_specs(cls)
    declared = [spec.name for spec in specs]
    assert sorted(declared) == sorted(names), f"{name}: inputs {declared} vs parameters {names}"
    for spec in specs:
        has_default = params[spec.name].default is not inspect.Parameter.empty
        assert has_default == (not spec.required), f"{name}.{spec.name}: optional inputs (only) need a default"


@pytest.mark.parametrize("name, cls", ALL_NODES)
def test_declared_outputs_and_metadata(name, cls, models_root):
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    for attribute in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attribute):
            assert len(getattr(cls, attribute)) == len(cls.RETURN_TYPES), f"{name}.{attribute}"
    assert cls.CATEGORY.startswith("TBAC-UniImage/")
    assert cls.DESCRIPTION.strip()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name)


@pytest.mark.parametrize("name, cls", ALL_NODES)
def test_every_input_has_a_tooltip_and_a_valid_default(name, cls, models_root):
    for spec in input_specs(cls):
        assert spec.options.get("tooltip", "").strip(), f"{name}.{spec.name} has no tooltip"
        if spec.type == "COMBO":
            assert spec.choices, f"{name}.{spec.name}: empty choice list"
            assert spec.options.get("default", spec.choices[0]) in spec.choices
        elif spec.type in ("INT", "FLOAT") and "default" in spec.options:
            low, high = spec.options.get("min", -float("inf")), spec.options.get("max", float("inf"))
            assert low <= spec.options["default"] <= high, f"{name}.{spec.name}: default out of range"


def test_custom_types_are_produced_by_some_node(models_root):
    produced = {t for cls in nodes.NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES}
    for name, cls in ALL_NODES:
        for spec in input_specs(cls):
            if spec.type != "COMBO" and spec.type not in CORE_TYPES:
                assert spec.type in produced, f"{name}.{spec.name}: no node outputs {spec.type}"
    assert {"TBAC_MODEL", "LADDER_CONDITIONING"} <= produced


def test_pack_imports_as_comfyui_loads_it():
    """ComfyUI imports <pack>/__init__.py under a mangled name; the three node modules are merged."""
    name = str(ROOT).replace(".", "_x_") + "_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        mappings = module.NODE_CLASS_MAPPINGS
        for part in ("model_nodes", "understand_nodes", "ladder_nodes"):
            part_module = sys.modules[f"{name}.nodes.{part}"]
            assert set(part_module.NODE_CLASS_MAPPINGS) <= set(mappings)
        assert set(mappings) == set(module.NODE_DISPLAY_NAME_MAPPINGS)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


def test_pyproject_mirrors_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert project["project"]["dependencies"] == requirements
    assert not any(dep.lower().startswith("torch") for dep in requirements)
    assert project["tool"]["comfy"]["DisplayName"] == "TBAC-UniImage"
    assert project["tool"]["comfy"]["PublisherId"]


# -- bridge outside ComfyUI ------------------------------------------------------------------
def test_bridge_falls_back_without_comfyui(models_root, monkeypatch):
    assert not bridge.IN_COMFYUI
    assert bridge.model_roots() == [models_root]
    assert bridge.cancel_check() is None and bridge.comfy_tokenizer_dir() is None
    assert bridge.intermediate_device() == torch.device("cpu")
    bridge.Progress(3).update(1, 3)  # a no-op, not an error
    cpu = bridge.devices_for("cpu")
    assert cpu.compute == cpu.initial == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidParameterError, match="no GPU"):
        bridge.devices_for("gpu")
    with pytest.raises(InvalidParameterError, match="auto, cpu, gpu"):
        bridge.devices_for("tpu")


def test_prepare_refuses_unknown_parts(model):
    model.prepare("mllm", "dit", "vae")  # nothing to move outside ComfyUI
    with pytest.raises(ValueError, match="Unknown model parts"):
        model.prepare("unet")


# -- loader ----------------------------------------------------------------------------------
def test_checkpoint_choices_and_names_that_escape(models_root):
    choices = model_nodes.TBACModelLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert choices == ["tbac-tiny", "demo"]
    for name in ("../tbac/tbac-tiny", str(models_root / "tbac-tiny"), "tiny-Qwen2.5-VL-Instruct", "nope"):
        with pytest.raises(CheckpointError, match="Available: tbac-tiny"):
            model_nodes.checkpoint_dir(name)


def test_demo_choice_explains_when_the_demo_model_is_missing(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tbac_core.demo", None)
    with pytest.raises(CheckpointError, match="demo model is not part of this installation"):
        model_nodes.TBACModelLoader().load("demo", "fp32", "cpu", "none")
    monkeypatch.setitem(sys.modules, "tbac_core.demo", types.SimpleNamespace(DEMO_CHECKPOINT=tmp_path / "none"))
    with pytest.raises(CheckpointError, match="demo model is not built"):
        model_nodes.TBACModelLoader().load("demo", "fp32", "cpu", "none")


def test_demo_choice_loads_the_built_in_checkpoint(models_root, fixture_root, tmp_path, monkeypatch):
    """'demo' loads tbac_core.demo.DEMO_CHECKPOINT, whose component folders sit inside it."""
    demo = tmp_path / "demo" / "checkpoint"
    demo.mkdir(parents=True)
    for path in [*(fixture_root / "checkpoint").iterdir(), fixture_root / "tiny-Qwen2.5-VL-Instruct",
                 fixture_root / "tiny-Sana_diffusers"]:
        (demo / path.name).symlink_to(path)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path / "empty"))  # nothing else to find it from
    monkeypatch.setitem(sys.modules, "tbac_core.demo", types.SimpleNamespace(DEMO_CHECKPOINT=demo))
    assert model_nodes.TBACModelLoader.INPUT_TYPES()["required"]["checkpoint"][0] == ["demo"]
    (loaded,) = model_nodes.TBACModelLoader().load("demo", "fp32", "cpu", "none")
    assert loaded.model.checkpoint_dir == demo and loaded.name == "demo"
    assert _encode(loaded, "a red circle on a blue background").batch_size == 1


def test_loader_output_is_a_fresh_model_each_call(model, models_root):
    """No hidden cache: reuse across queue runs is ComfyUI's output cache, keyed by the widgets."""
    (again,) = model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "none")
    assert again is not model and again.model is not model.model
    assert again.identity == model.identity and again.name == "tbac-tiny"
    assert next(again.model.dit.parameters()).dtype == torch.float32


def test_tokenizer_fallback_is_used_only_when_the_core_finds_none(tmp_path, fixture_root, monkeypatch):
    """Inside ComfyUI the bundled Qwen2.5 tokenizer is passed only if the checkpoint has none."""
    root = tmp_path / "tbac"
    root.mkdir()
    (root / "tbac-tiny").symlink_to(fixture_root / "checkpoint")
    (root / "tiny-Sana_diffusers").symlink_to(fixture_root / "tiny-Sana_diffusers")
    mllm = root / "tiny-Qwen2.5-VL-Instruct"  # configs only, no tokenizer files
    mllm.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(fixture_root / "tiny-Qwen2.5-VL-Instruct" / name, mllm / name)
    bundled = tmp_path / "qwen25_tokenizer"
    bundled.mkdir()
    for path in (fixture_root / "tiny-Qwen2.5-VL-Instruct").iterdir():
        if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")):
            shutil.copy(path, bundled / path.name)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(root))
    assert not model_nodes.core_finds_tokenizer(root / "tbac-tiny", [root])
    with pytest.raises(ComponentNotFoundError, match="No Qwen2.5 tokenizer"):
        model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "none")
    monkeypatch.setattr(bridge, "comfy_tokenizer_dir", lambda: bundled)
    (loaded,) = model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "none")
    assert Path(loaded.model.prompts.tokenizer.name_or_path) == bundled
    assert model_nodes.core_finds_tokenizer(fixture_root / "checkpoint", [])


def test_adapters_are_listed_and_applied_by_name(tmp_path, model, models_root, monkeypatch):
    from tbac_core.loading.adapters import AdapterError, base_record, write_adapter

    base = model.model
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(base.config.num_metaqueries, base.identity.hidden_size, generator=generator)
    adapters = tmp_path / "tbac_adapters"
    write_adapter(adapters / "shapes" / "final", {"metaqueries.rows": rows},
                  {"base": base_record(base), "parts": {"dit": "frozen"}})
    other = dict(base_record(base), fingerprint="0" * 64)
    write_adapter(adapters / "other-base", {"metaqueries.rows": rows}, {"base": other, "parts": {"dit": "frozen"}})
    (adapters / "empty").mkdir()
    monkeypatch.setenv(bridge.ADAPTERS_DIR_ENV, str(adapters))
    choices = model_nodes.TBACModelLoader.INPUT_TYPES()["required"]["adapter"][0]
    assert choices == ["none", "other-base", "shapes/final"]

    (tuned,) = model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "shapes/final")
    assert tuned.name == "tbac-tiny + shapes/final"
    embedding = tuned.model.mllm.get_input_embeddings().weight
    start = tuned.model.base_vocab
    torch.testing.assert_close(embedding[start:start + len(rows)], rows, atol=0, rtol=0)
    assert tuned.identity.fingerprint != model.identity.fingerprint  # old conditionings are refused
    with pytest.raises(AdapterError, match="trained on base model"):
        model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", "other-base")
    for name in ("empty", "../tbac_adapters/shapes/final", str(adapters / "shapes" / "final")):
        with pytest.raises(CheckpointError, match="Available: other-base, shapes/final"):
            model_nodes.TBACModelLoader().load("tbac-tiny", "fp32", "cpu", name)


# -- encode ------------------------------------------------------------------------------------
def _encode(model, prompt, **kwargs):
    options = dict(negative_prompt="", layers="default", keep_all_rungs=False, one_prompt_per_line=False)
    options.update(kwargs)
    return model_nodes.TBACLadderEncode().encode(model, prompt, **options)[0]


def test_encode_matches_the_library_and_splits_lines(model, pipe):
    cond = _encode(model, "a red cat\n\n  a blue house \n", one_prompt_per_line=True, negative_prompt="blurry")
    reference = pipe.model.encode(["a red cat", "a blue house"], negative_prompt="blurry")
    assert cond.prompts == ("a red cat", "a blue house") and cond.batch_size == 2
    torch.testing.assert_close(cond.sources[0].positive, reference.sources[0].positive, atol=0, rtol=0)
    assert cond.sources[0].positive.device.type == "cpu"
    whole = _encode(model, "a red cat\na blue house")
    assert whole.prompts == ("a red cat\na blue house",)


def test_encode_uses_every_image_of_the_batch_as_inputs_of_the_prompt(model, pipe):
    images = _image_batch(2)
    cond = _encode(model, "make it blue", images=images, layers="0,2,4")
    assert cond.sources[0].num_input_images == (2,) and cond.has_image_guidance
    assert cond.block_rungs() == [0, 2, 2, 4]  # 3 rungs spread over 4 blocks
    reference = pipe.model.encode("make it blue", images=[list(images)], layers="0,2,4")
    torch.testing.assert_close(cond.sources[0].positive, reference.sources[0].positive, atol=1e-6, rtol=0)


def test_encode_refuses_a_bad_layer_spec_before_running_the_mllm(model, monkeypatch):
    prepared = []
    monkeypatch.setattr(model, "prepare", lambda *parts: prepared.append(parts))
    with pytest.raises(LayerSpecError, match="Valid rungs are 0..6"):
        _encode(model, "a cat", layers="3-99")
    with pytest.raises(InvalidParameterError, match="no non-blank line"):
        _encode(model, " \n ", one_prompt_per_line=True)
    assert prepared == []


# -- sample / decode / encode image --------------------------------------------------------------
def _sample(model, cond, latent=None, **kwargs):
    options = dict(seed=5, steps=STEPS, guidance=4.5, image_guidance=1.5, width=64, height=64, batch_size=1,
                   sampler="dpm++", denoise=1.0)
    options.update(kwargs)
    return model_nodes.TBACSampler().sample(model, cond, latent=latent, **options)[0]


def test_sampler_matches_the_library_and_drives_progress(model, pipe, monkeypatch):
    updates = []
    monkeypatch.setattr(bridge.Progress, "update", lambda self, done, total: updates.append((done, total)))
    cond = _encode(model, "a red cat\na green frog", one_prompt_per_line=True)
    latent = _sample(model, cond, batch_size=2, seed=2**64 - 1, sampler="euler")
    params = SamplingParams(steps=STEPS, seed=2**64 - 1, sampler="euler", num_images_per_prompt=2)
    reference = pipe.sample(cond, width=64, height=64, params=params)
    assert set(latent) == {"samples"} and latent["samples"].shape == (4, 8, 8, 8)
    torch.testing.assert_close(latent["samples"], reference, atol=0, rtol=0)
    assert updates == [(1, STEPS), (2, STEPS), (3, STEPS)]


def test_sampler_refuses_bad_sizes_and_foreign_latents(model):
    cond = _encode(model, "a cat")
    with pytest.raises(InvalidParameterError, match="multiple of 8"):
        _sample(model, cond, width=60)
    with pytest.raises(InvalidParameterError, match="has 4 channels"):
        _sample(model, cond, latent={"samples": torch.zeros(1, 4, 8, 8)}, denoise=0.5)
    with pytest.raises(InvalidParameterError, match="noise mask"):
        _sample(model, cond, latent={"samples": torch.zeros(1, 8, 8, 8), "noise_mask": torch.ones(1, 64, 64)})


def test_decode_encode_and_image_to_image(model, pipe):
    cond = _encode(model, "a cat")
    latent = _sample(model, cond)
    (images,) = model_nodes.TBACDecode().decode(model, latent, "auto")
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    torch.testing.assert_close(images, pipe.decode(latent["samples"]), atol=0, rtol=0)
    (tiled,) = model_nodes.TBACDecode().decode(model, latent, "on")
    assert tiled.shape == images.shape

    odd = _image_batch(1, size=(70, 67))
    (encoded,) = model_nodes.TBACEncodeImage().encode(model, odd, True)
    assert encoded["samples"].shape == (1, 8, 8, 8)
    torch.testing.assert_close(encoded["samples"], pipe.encode_image(odd[:, 1:65, 3:67]), atol=0, rtol=0)
    with pytest.raises(InvalidParameterError, match="multiple of 8"):
        model_nodes.TBACEncodeImage().encode(model, odd, False)

    start = _sample(model, cond, latent=encoded, denoise=0.5, steps=4, width=512, height=512)
    params = SamplingParams(steps=4, seed=5, denoise=0.5)
    reference = pipe.sample(cond, params=params, init_latents=encoded["samples"])
    torch.testing.assert_close(start["samples"], reference, atol=0, rtol=0)


# -- cancellation ------------------------------------------------------------------------------
def _cancel_after(calls: int, counter: list):
    def check():
        counter.append(1)
        if len(counter) > calls:
            raise Interrupt()
    return check


def test_cancel_stops_sampling_and_propagates(model, monkeypatch):
    cond = _encode(model, "a cat")
    counter, steps = [], []
    monkeypatch.setattr(bridge, "cancel_check", lambda: _cancel_after(2, counter))
    monkeypatch.setattr(bridge.Progress, "update", lambda self, done, total: steps.append(done))
    with pytest.raises(Interrupt):
        _sample(model, cond, steps=10)
    assert steps == [1, 2]  # stopped before the third step


def test_cancel_stops_encoding_and_decoding(model, monkeypatch):
    counter = []
    monkeypatch.setattr(bridge, "cancel_check", lambda: _cancel_after(1, counter))
    with pytest.raises(Interrupt):
        _encode(model, "a cat")
    latent = {"samples": torch.zeros(1, 8, 8, 8)}
    monkeypatch.setattr(bridge, "cancel_check", lambda: _cancel_after(0, []))
    with pytest.raises(Interrupt):
        model_nodes.TBACDecode().decode(model, latent, "auto")
    monkeypatch.setattr(bridge, "cancel_check", lambda: None)
    assert _encode(model, "a cat").batch_size == 1  # the model still works afterwards


# -- understanding -----------------------------------------------------------------------------
def _understand(model, **kwargs):
    options = dict(preset="custom", question="What colour is the square?", max_new_tokens=4, do_sample=False,
                   temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.0, seed=0)
    options.update(kwargs)
    return understand_nodes.TBACUnderstand().understand(model, **options)[0]


def test_understand_answers_and_follows_the_library(model, fixture_root):
    from tbac_core.params import GenerationSettings
    from tbac_core.pipeline.understanding import answer

    pil = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]
    reply = _understand(model, images=image)
    settings = GenerationSettings(max_new_tokens=4, do_sample=False, temperature=0.7, top_p=0.9, top_k=0,
                                  repetition_penalty=1.0, seed=0)
    assert isinstance(reply, str)
    assert reply == answer(model.model, "What colour is the square?", images=[pil], settings=settings)
    sampled = dict(do_sample=True, temperature=1.0, seed=2**64 - 1, max_new_tokens=6)
    assert _understand(model, **sampled) == _understand(model, **sampled)


def test_understand_presets_and_question(model):
    from tbac_core.params import GenerationSettings
    from tbac_core.pipeline.understanding import PRESETS, answer, resolve_question

    preset = "write a generation prompt for this image"
    assert preset in PRESETS and "custom" in PRESETS
    settings = GenerationSettings(max_new_tokens=4, top_k=0, repetition_penalty=1.0)
    expected = answer(model.model, resolve_question(preset, "Mention the colours."), settings=settings)
    assert _understand(model, preset=preset, question="Mention the colours.") == expected
    with pytest.raises(InvalidParameterError, match="question is empty"):
        _understand(model, preset="custom", question="  ")


def test_cancel_stops_understanding(model, monkeypatch):
    monkeypatch.setattr(bridge, "cancel_check", lambda: _cancel_after(1, []))
    with pytest.raises(Interrupt):
        _understand(model, max_new_tokens=20)


# -- small library helpers of the nodes ----------------------------------------------------------
@pytest.mark.parametrize("text, per_line, expected", [
    ("a cat", False, ["a cat"]),
    ("a cat\na dog", False, ["a cat\na dog"]),
    ("", False, [""]),
    ("a cat\na dog", True, ["a cat", "a dog"]),
    ("  a cat  \r\n\n\t\n a dog\n", True, ["a cat", "a dog"]),
])
def test_split_prompts(text, per_line, expected):
    assert split_prompts(text, per_line) == expected


@pytest.mark.parametrize("text", ["", "\n \n\t"])
def test_split_prompts_refuses_an_empty_list(text):
    with pytest.raises(InvalidParameterError, match="no non-blank line"):
        split_prompts(text, True)


@pytest.mark.parametrize("size, factor, cropped", [((64, 64), 8, (64, 64)), ((70, 67), 8, (64, 64)),
                                                    ((100, 33), 32, (96, 32))])
def test_crop_to_multiple(size, factor, cropped):
    images = _image_batch(2, size=size)
    out = crop_to_multiple(images, factor)
    assert tuple(out.shape) == (2, cropped[1], cropped[0], 3)
    top, left = (size[1] - cropped[1]) // 2, (size[0] - cropped[0]) // 2
    torch.testing.assert_close(out, images[:, top:top + cropped[1], left:left + cropped[0]], atol=0, rtol=0)


def test_crop_to_multiple_refuses_tiny_images():
    with pytest.raises(InvalidParameterError, match="smaller than the latent factor 32"):
        crop_to_multiple(_image_batch(1, size=(40, 20)), 32)
