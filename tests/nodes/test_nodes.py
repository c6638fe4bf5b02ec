"""The ComfyUI nodes without ComfyUI: declarations, loading, each node against the library, cancellation.

The pack is imported as ComfyUI imports it (``tests/support/pack.py``); library names come from the
pack's own copy of ``tbac_core``, the one the nodes use.
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from graph_runner import input_specs, make_models_root
from pack import NODE_CLASSES, PACK, PACK_NAME, outputs
from PIL import Image

bridge = PACK.nodes.comfy_bridge
loader = PACK.nodes.loader
generate = PACK.nodes.generate
understand = PACK.nodes.understand
ladder_nodes = PACK.nodes.ladder
CheckpointError = PACK.tbac_core.errors.CheckpointError
ComponentNotFoundError = PACK.tbac_core.errors.ComponentNotFoundError
InvalidParameterError = PACK.tbac_core.errors.InvalidParameterError
LayerSpecError = PACK.tbac_core.errors.LayerSpecError
SamplingParams = PACK.tbac_core.params.SamplingParams
crop_to_multiple = PACK.tbac_core.processing.crop_to_multiple
split_prompts = PACK.tbac_core.processing.split_prompts
NODE_IDS = {
    "TBACModelLoader", "TBACLadderEncode", "TBACSampler", "TBACDecode", "TBACEncodeImage", "TBACUnderstand",
    "TBACLadderSelectLayers", "TBACLadderWeight", "TBACLadderMix", "TBACLadderInspect", "TBACLadderSave",
    "TBACLadderLoad", "TBACNativeModel", "TBACToConditioning", "TBACFlowSigmas", "TBACNativeVAE",
}

ROOT = Path(__file__).resolve().parents[2]
CORE_TYPES = {"IMAGE", "LATENT", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "CONDITIONING", "MODEL", "SIGMAS", "VAE", "*"}
STEPS = 3


class Interrupt(BaseException):
    """Stands in for ComfyUI's InterruptProcessingException (also a BaseException)."""


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, fixture_root):
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        yield root


def _load(checkpoint="tbac-tiny", adapter="none"):
    (loaded,) = outputs(loader.TBACModelLoader, checkpoint=checkpoint, dtype="fp32", device="cpu", adapter=adapter)
    return loaded


def _choices(cls, name: str) -> list:
    return [list(spec.choices) for spec in input_specs(cls) if spec.name == name][0]


@pytest.fixture(scope="module")
def model(models_root):
    return _load()


def _image_batch(count: int, size=(64, 64), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, size[1], size[0], 3, generator=generator)


# -- declarations ----------------------------------------------------------------------------
ALL_NODES = sorted(NODE_CLASSES.items())


@pytest.mark.parametrize("name, cls", ALL_NODES)
def test_declared_inputs_match_the_function(name, cls, models_root):
    specs = input_specs(cls)
    declared = [spec.name for spec in specs]
    if issubclass(cls, ladder_nodes.LadderEdit):  # execute(**inputs) hands them to the edit in declared order
        params = inspect.signature(cls.edit).parameters
        assert len(params) == len(declared) and all(spec.required for spec in specs), name
        return
    params = inspect.signature(cls.execute).parameters
    names = list(params)
    assert sorted(declared) == sorted(names), f"{name}: inputs {declared} vs parameters {names}"
    for spec in specs:
        has_default = params[spec.name].default is not inspect.Parameter.empty
        assert has_default == (not spec.required), f"{name}.{spec.name}: optional inputs (only) need a default"


@pytest.mark.parametrize("name, cls", ALL_NODES)
def test_declared_outputs_and_metadata(name, cls, models_root):
    assert isinstance(cls.RETURN_TYPES, list) and cls.RETURN_TYPES  # a list, as V3 nodes give it
    for attribute in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attribute):
            assert len(getattr(cls, attribute)) == len(cls.RETURN_TYPES), f"{name}.{attribute}"
    assert cls.CATEGORY.startswith("TBAC-UniImage/")
    assert cls.DESCRIPTION.strip()
    assert cls.GET_SCHEMA().display_name


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
    produced = {t for cls in NODE_CLASSES.values() for t in cls.RETURN_TYPES}
    for name, cls in ALL_NODES:
        for spec in input_specs(cls):
            if spec.type != "COMBO" and spec.type not in CORE_TYPES:
                assert spec.type in produced, f"{name}.{spec.name}: no node outputs {spec.type}"
    assert {"TBAC_MODEL", "LADDER_CONDITIONING"} <= produced


def test_pack_imports_as_comfyui_loads_it():
    """ComfyUI imports <pack>/__init__.py under a mangled name and, without mappings, calls comfy_entrypoint."""
    name = str(ROOT).replace(".", "_x_") + "_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    path_before = list(sys.path)
    try:
        spec.loader.exec_module(module)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI would use it and skip the entry point
        assert inspect.iscoroutinefunction(module.comfy_entrypoint)
        extension = asyncio.run(module.comfy_entrypoint())
        assert isinstance(extension, sys.modules["comfy_api.v0_0_2"].ComfyExtension)
        classes = asyncio.run(extension.get_node_list())
        ids = [cls.GET_SCHEMA().node_id for cls in classes]
        assert sorted(ids) == sorted(NODE_IDS) and len(ids) == 16
        assert all(cls.__module__.startswith(f"{name}.nodes.") for cls in classes)
        assert sys.modules[f"{name}.tbac_core"] is not sys.modules.get("tbac_core")  # its own copy of the library
        assert sys.path == path_before
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


def test_the_bridge_is_the_only_comfyui_import():
    comfy_import = re.compile(r"^\s*(from|import)\s+(comfy\b|comfy_api\b|folder_paths\b)", re.MULTILINE)
    for path in (ROOT / "nodes").glob("*.py"):
        text = path.read_text()
        if path.name != "comfy_bridge.py":
            assert not comfy_import.search(text), f"{path.name} imports ComfyUI"
        assert not re.search(r"^\s*(from|import)\s+tbac_core\b", text, re.MULTILINE), f"{path.name}: absolute import"
    bridge_text = (ROOT / "nodes" / "comfy_bridge.py").read_text()
    assert "from comfy_api.v0_0_2 import" in bridge_text and "comfy_api.latest" not in bridge_text


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


def test_placement_yields_the_parts_and_refuses_unknown_ones(model):
    placement = model.pipeline.placement
    for part in ("mllm", "dit", "vae"):
        with placement.use(part) as module:  # nothing to move outside ComfyUI
            assert module is getattr(model.model, part)
    with pytest.raises(ValueError, match="Unknown model parts"):
        with placement.use("unet"):
            pass


# -- loader ----------------------------------------------------------------------------------
def test_checkpoint_choices_and_names_that_escape(models_root):
    choices = _choices(loader.TBACModelLoader, "checkpoint")
    assert choices == ["tbac-tiny", "demo"]
    for name in ("../tbac/tbac-tiny", str(models_root / "tbac-tiny"), "tiny-Qwen2.5-VL-Instruct", "nope"):
        with pytest.raises(CheckpointError, match="Available: tbac-tiny"):
            loader.checkpoint_dir(name)


DEMO_MODULE = f"{PACK_NAME}.tbac_core.demo"


def test_demo_choice_explains_when_the_demo_model_is_missing(models_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, DEMO_MODULE, None)
    with pytest.raises(CheckpointError, match="demo model is not part of this installation"):
        _load("demo")
    monkeypatch.setitem(sys.modules, DEMO_MODULE, types.SimpleNamespace(DEMO_CHECKPOINT=tmp_path / "none"))
    with pytest.raises(CheckpointError, match="demo model is not built"):
        _load("demo")


def test_demo_choice_loads_the_built_in_checkpoint(models_root, fixture_root, tmp_path, monkeypatch):
    """'demo' loads tbac_core.demo.DEMO_CHECKPOINT, whose component folders sit inside it."""
    demo = tmp_path / "demo" / "checkpoint"
    demo.mkdir(parents=True)
    for path in [*(fixture_root / "checkpoint").iterdir(), fixture_root / "tiny-Qwen2.5-VL-Instruct",
                 fixture_root / "tiny-Sana_diffusers"]:
        (demo / path.name).symlink_to(path)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path / "empty"))  # nothing else to find it from
    monkeypatch.setitem(sys.modules, DEMO_MODULE, types.SimpleNamespace(DEMO_CHECKPOINT=demo))
    assert _choices(loader.TBACModelLoader, "checkpoint") == ["demo"]
    loaded = _load("demo")
    assert loaded.model.checkpoint_dir == demo and loaded.name == "demo"
    assert _encode(loaded, "a red circle on a blue background").batch_size == 1


def test_loader_output_is_a_fresh_model_each_call(model, models_root):
    """No hidden cache: reuse across queue runs is ComfyUI's output cache, keyed by the widgets."""
    again = _load()
    assert again is not model and again.model is not model.model
    assert again.identity == model.identity and again.name == "tbac-tiny"
    assert next(again.model.dit.parameters()).dtype == torch.float32


def test_loader_weights_input_quantises_while_loading(models_root):
    """'weights' picks fp8 / GGUF block formats for the linears of the MLLM and DiT; left out (an API
    workflow saved before the input existed) or 'as stored', the checkpoint loads as it is."""
    def first_layer(loaded):  # by name: the pack's classes live under the pack's import name here
        return type(loaded.model.dit.transformer.transformer_blocks[0].attn1.to_q).__name__

    assert _choices(loader.TBACModelLoader, "weights") == ["as stored", "fp8", "q8_0", "q5_k", "q4_k"]
    for weights, layer in (("fp8", "FP8Linear"), ("q4_k", "GGUFLinear"), ("as stored", "OneDNNLinear")):
        (loaded,) = outputs(loader.TBACModelLoader, checkpoint="tbac-tiny", dtype="fp32", device="cpu",
                            adapter="none", weights=weights)
        assert first_layer(loaded) == layer, weights
        assert torch.isfinite(_encode(loaded, "a red circle").block_conditions("positive", lambda s: s)[0]).all()
    assert first_layer(_load()) == "OneDNNLinear"  # the input left out (onednn_linear: a plain nn.Linear)


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
    with pytest.raises(ComponentNotFoundError, match="No Qwen2.5 tokenizer"):
        _load()
    monkeypatch.setattr(bridge, "comfy_tokenizer_dir", lambda: bundled)
    loaded = _load()
    assert Path(loaded.model.prompts.tokenizer.name_or_path) == bundled
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(make_models_root(tmp_path / "full" / "tbac", fixture_root)))
    own = _load()  # the checkpoint's MLLM folder has a tokenizer: the bundled one is not used
    assert Path(own.model.prompts.tokenizer.name_or_path) != bundled


def test_adapters_are_listed_and_applied_by_name(tmp_path, model, models_root, monkeypatch):
    from tbac_uniimage_pack.tbac_core.errors import AdapterError
    from tbac_uniimage_pack.tbac_core.loading.adapters import base_record, write_adapter

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
    choices = _choices(loader.TBACModelLoader, "adapter")
    assert choices == ["none", "other-base", "shapes/final"]

    tuned = _load(adapter="shapes/final")
    assert tuned.name == "tbac-tiny + shapes/final"
    embedding = tuned.model.mllm.get_input_embeddings().weight
    start = tuned.model.base_vocab
    torch.testing.assert_close(embedding[start:start + len(rows)], rows, atol=0, rtol=0)
    assert tuned.identity.fingerprint != model.identity.fingerprint  # old conditionings are refused
    with pytest.raises(AdapterError, match="trained on base model"):
        _load(adapter="other-base")
    for name in ("empty", "../tbac_adapters/shapes/final", str(adapters / "shapes" / "final")):
        with pytest.raises(CheckpointError, match="Available: other-base, shapes/final"):
            _load(adapter=name)


# -- encode ------------------------------------------------------------------------------------
def _encode(model, prompt, **kwargs):
    options = dict(negative_prompt="", layers="default", keep_all_rungs=False, one_prompt_per_line=False)
    options.update(kwargs)
    return outputs(generate.TBACLadderEncode, model=model, prompt=prompt, **options)[0]


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


class RecordingPlacement:
    """A placement that records which parts the pipeline asked for."""

    def __init__(self, inner):
        self.inner, self.used = inner, []

    def use(self, part):
        self.used.append(part)
        return self.inner.use(part)


def test_encode_refuses_a_bad_layer_spec_before_running_the_mllm(model, monkeypatch):
    placement = RecordingPlacement(model.pipeline.placement)
    monkeypatch.setattr(model.pipeline, "placement", placement)
    prepared = placement.used
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
    return outputs(generate.TBACSampler, model=model, conditioning=cond, latent=latent, **options)[0]


def test_sampler_matches_the_library_and_drives_progress(model, pipe, monkeypatch):
    updates = []
    monkeypatch.setattr(bridge.Progress, "update", lambda self, done, total, preview=None: updates.append((done, total)))
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
    with pytest.raises(InvalidParameterError, match="expected 1 or 1"):
        _sample(model, cond, latent={"samples": torch.zeros(1, 8, 8, 8), "noise_mask": torch.ones(3, 64, 64)})


def test_decode_encode_and_image_to_image(model, pipe):
    cond = _encode(model, "a cat")
    latent = _sample(model, cond)
    (images,) = outputs(generate.TBACDecode, model=model, latent=latent, tiling="auto")
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    torch.testing.assert_close(images, pipe.decode(latent["samples"]), atol=0, rtol=0)
    (tiled,) = outputs(generate.TBACDecode, model=model, latent=latent, tiling="on")
    assert tiled.shape == images.shape

    odd = _image_batch(1, size=(70, 67))
    (encoded,) = outputs(generate.TBACEncodeImage, model=model, images=odd, crop_to_multiple=True)
    assert encoded["samples"].shape == (1, 8, 8, 8)
    torch.testing.assert_close(encoded["samples"], pipe.encode_image(odd[:, 1:65, 3:67]), atol=0, rtol=0)
    with pytest.raises(InvalidParameterError, match="multiple of 8"):
        outputs(generate.TBACEncodeImage, model=model, images=odd, crop_to_multiple=False)

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
    monkeypatch.setattr(bridge.Progress, "update", lambda self, done, total, preview=None: steps.append(done))
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
        outputs(generate.TBACDecode, model=model, latent=latent, tiling="auto")
    monkeypatch.setattr(bridge, "cancel_check", lambda: None)
    assert _encode(model, "a cat").batch_size == 1  # the model still works afterwards


# -- understanding -----------------------------------------------------------------------------
def _understand(model, **kwargs):
    options = dict(preset="custom", question="What colour is the square?", max_new_tokens=4, do_sample=False,
                   temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.0, seed=0)
    options.update(kwargs)
    return outputs(understand.TBACUnderstand, model=model, **options)[0]


def test_understand_answers_and_follows_the_library(model, fixture_root):
    GenerationSettings = PACK.tbac_core.params.GenerationSettings
    answer = PACK.tbac_core.pipeline.answer

    pil = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]
    reply = _understand(model, images=image)
    settings = GenerationSettings(max_new_tokens=4, do_sample=False, temperature=0.7, top_p=0.9, top_k=0,
                                  repetition_penalty=1.0, seed=0)
    assert isinstance(reply, str)
    assert reply == answer(model.pipeline, "What colour is the square?", images=[pil], settings=settings)
    sampled = dict(do_sample=True, temperature=1.0, seed=2**64 - 1, max_new_tokens=6)
    assert _understand(model, **sampled) == _understand(model, **sampled)


def test_understand_presets_and_question(model):
    GenerationSettings = PACK.tbac_core.params.GenerationSettings
    PRESETS, answer = PACK.tbac_core.pipeline.PRESETS, PACK.tbac_core.pipeline.answer
    resolve_question = PACK.tbac_core.pipeline.resolve_question

    preset = "write a generation prompt for this image"
    assert preset in PRESETS and "custom" in PRESETS
    settings = GenerationSettings(max_new_tokens=4, top_k=0, repetition_penalty=1.0)
    expected = answer(model.pipeline, resolve_question(preset, "Mention the colours."), settings=settings)
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
