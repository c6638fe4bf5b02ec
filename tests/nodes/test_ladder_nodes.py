"""The ladder nodes without ComfyUI: each node against the library, the save folder, loading, a graph."""
from __future__ import annotations

import os
import types
from dataclasses import replace

import pytest
import torch
from graph_runner import GraphRunner, Recorder, make_core_doubles, make_models_root
from pack import NODE_CLASSES, PACK, outputs, run_node

bridge = PACK.nodes.comfy_bridge
ln = PACK.nodes.ladder
ladder_ops = PACK.tbac_core.ladder
IncompatibleConditioningError = PACK.tbac_core.errors.IncompatibleConditioningError
InvalidParameterError = PACK.tbac_core.errors.InvalidParameterError
LayerSpecError = PACK.tbac_core.errors.LayerSpecError

PROMPT_A = "a red cat sitting on a blue chair"
PROMPT_B = "a small green house next to the river"


def _save(conditioning, prefix):
    """The Save node's run as ComfyUI records it: its outputs and what it shows in the UI."""
    result, ui = run_node(ln.TBACLadderSave, conditioning=conditioning, filename_prefix=prefix)
    return {"ui": ui, "result": result}


def _file_choices() -> list:
    return ln.TBACLadderLoad.INPUT_TYPES()["required"]["file"][1]["options"]


@pytest.fixture(scope="module")
def model(pipe):
    """The TBAC_MODEL value around the session's tiny model (no second load)."""
    return bridge.ManagedModel(pipe.model, bridge.devices_for("cpu"), "tbac-tiny")


@pytest.fixture(scope="module")
def a_all(pipe):
    return pipe.encode(PROMPT_A, keep_all_rungs=True)


@pytest.fixture(scope="module")
def b_all(pipe):
    return pipe.encode(PROMPT_B, keep_all_rungs=True)


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(bridge.OUTPUT_DIR_ENV, str(tmp_path / "output"))
    return tmp_path / "output"


def test_nodes_are_registered_in_the_ladder_category():
    assert set(ln.NODES) <= set(NODE_CLASSES.values()) and len(ln.NODES) == 6
    for cls in ln.NODES:
        assert cls.CATEGORY == "TBAC-UniImage/ladder" and cls.GET_SCHEMA().display_name.startswith("TBAC Ladder")
    assert ln.TBACLadderSave.OUTPUT_NODE and not getattr(ln.TBACLadderInspect, "OUTPUT_NODE", False)


# -- select, weight, mix -----------------------------------------------------------------------------
def test_select_weight_mix_nodes_call_the_library(a_all, b_all):
    (selected,) = outputs(ln.TBACLadderSelectLayers, conditioning=a_all, layers="last 2")
    assert selected.blocks == ladder_ops.select_layers(a_all, "last 2").blocks
    (weighted,) = outputs(ln.TBACLadderWeight, conditioning=a_all, weights="0-1:1.0, 2-3:0.6")
    assert [t[0].weight for t in weighted.blocks] == [1.0, 1.0, 0.6, 0.6]
    (mixed,) = outputs(ln.TBACLadderMix, a=a_all, b=b_all, mix="0-1:a, 2-3:b")
    assert [t[0].source for t in mixed.blocks] == [0, 0, 1, 1] and mixed.sources[1] is b_all.sources[0]


def test_select_node_says_to_keep_all_rungs(pipe):
    with pytest.raises(IncompatibleConditioningError, match="keep_all_rungs"):
        outputs(ln.TBACLadderSelectLayers, conditioning=pipe.encode(PROMPT_A), layers="final")
    with pytest.raises(LayerSpecError, match="Valid rungs|out of range"):
        outputs(ln.TBACLadderSelectLayers, conditioning=pipe.encode(PROMPT_A), layers="99")


def test_mix_node_refuses_a_bad_spec(a_all, b_all):
    with pytest.raises(LayerSpecError, match="Invalid mix spec"):
        outputs(ln.TBACLadderMix, a=a_all, b=b_all, mix="0-9:a, 10-19:b")


# -- inspect -----------------------------------------------------------------------------------------
def test_inspect_node_outputs_an_image_and_text(a_all, b_all, model):
    image, summary = outputs(ln.TBACLadderInspect, conditioning=a_all)
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    assert "Mapping: blocks 0-3 <- rungs 2-5" in summary
    mixed = ladder_ops.mix(a_all, b_all, "fade")
    plot, text = outputs(ln.TBACLadderInspect, conditioning=mixed, other=b_all, model=model)
    assert plot.shape[1] > image.shape[1] and "caption space" in text
    _, text = outputs(ln.TBACLadderInspect, conditioning=mixed, other=b_all)
    assert "no model given" in text


def test_inspect_node_refuses_conditioning_of_another_model(a_all, model):
    stranger = replace(a_all, model=replace(a_all.model, name="elsewhere", fingerprint="1" * 64))
    with pytest.raises(IncompatibleConditioningError, match="elsewhere"):
        outputs(ln.TBACLadderInspect, conditioning=stranger, model=model)


# -- save --------------------------------------------------------------------------------------------
def test_save_node_counts_up_and_never_overwrites(output_dir, a_all, b_all):
    first = _save(a_all, "TBAC_ladder")
    second = _save(b_all, "TBAC_ladder")
    assert first["result"] == ("TBAC_ladder_00001_.safetensors",)
    assert second["result"] == ("TBAC_ladder_00002_.safetensors",)
    assert first["ui"] == {"text": ["tbac_ladder/TBAC_ladder_00001_.safetensors"]}
    folder = output_dir / "tbac_ladder"
    assert ladder_ops.load_conditioning(folder / "TBAC_ladder_00001_.safetensors").prompts == (PROMPT_A,)
    (folder / "TBAC_ladder_00007_.safetensors").write_bytes(b"taken")
    (folder / "TBAC_ladder_extra_00009_.safetensors").write_bytes(b"another prefix")
    (folder / "TBAC_ladder_x9_.safetensors").write_bytes(b"not a counter")
    assert _save(a_all, "TBAC_ladder")["result"] == ("TBAC_ladder_00008_.safetensors",)
    assert (folder / "TBAC_ladder_00007_.safetensors").read_bytes() == b"taken"


def test_save_node_retries_when_a_name_is_taken_meanwhile(output_dir, a_all, monkeypatch):
    calls = []

    def stale_counter(folder, stem):  # as if another run saved between counting and writing
        calls.append(stem)
        return 1 if len(calls) == 1 else 2

    _save(a_all, "race")
    monkeypatch.setattr(ln, "next_counter", stale_counter)
    assert _save(a_all, "race")["result"] == ("race_00002_.safetensors",)
    assert len(calls) == 2


def test_save_node_writes_sub_folders_but_not_outside(output_dir, a_all):
    result = _save(a_all, "looks/portrait")
    assert result["result"] == ("looks/portrait_00001_.safetensors",)
    assert (output_dir / "tbac_ladder" / "looks" / "portrait_00001_.safetensors").is_file()
    for prefix in ("../escape", "looks/../../escape", "/tmp/escape", "", "looks/", " "):
        with pytest.raises(InvalidParameterError, match="filename_prefix"):
            _save(a_all, prefix)
    assert sorted(p.name for p in output_dir.iterdir()) == ["tbac_ladder"]


# -- load --------------------------------------------------------------------------------------------
def test_load_node_lists_and_loads_saved_files(output_dir, a_all, b_all, model):
    choices = _file_choices()
    assert choices == [ln.NO_FILE]
    mixed = ladder_ops.weight_blocks(ladder_ops.mix(a_all, b_all, "fade"), "3:0.25")
    (name,) = _save(mixed, "look")["result"]
    _save(a_all, "sub/other")
    choices = _file_choices()
    assert choices == [ln.NO_FILE, "look_00001_.safetensors", "sub/other_00001_.safetensors"]
    (loaded,) = outputs(ln.TBACLadderLoad, model=model, file=name, path="")
    assert loaded.blocks == mixed.blocks
    for x, y in zip(mixed.sources, loaded.sources):
        assert torch.equal(x.positive, y.positive) and torch.equal(x.negative, y.negative)
    path = output_dir / "tbac_ladder" / "sub" / "other_00001_.safetensors"
    for typed in (str(path), "sub/other_00001_.safetensors"):
        (by_path,) = outputs(ln.TBACLadderLoad, model=model, file=ln.NO_FILE, path=typed)
        assert by_path.prompts == (PROMPT_A,)


@pytest.mark.parametrize("file, path, message", [
    (ln.NO_FILE, "", "No file was chosen"),
    ("gone_00001_.safetensors", "", "is not a saved conditioning"),
    ("../../secret.safetensors", "", "is not a saved conditioning"),
    (ln.NO_FILE, "notes.txt", "is not a .safetensors file"),
])
def test_load_node_refuses_missing_choices(output_dir, model, file, path, message):
    with pytest.raises(InvalidParameterError, match=message):
        outputs(ln.TBACLadderLoad, model=model, file=file, path=path)


def test_load_node_refuses_files_of_another_model(output_dir, a_all, model):
    (name,) = _save(a_all, "look")["result"]
    other = types.SimpleNamespace(identity=replace(model.identity, name="TBAC-UniImage-3B", fingerprint="9" * 64))
    with pytest.raises(IncompatibleConditioningError, match="TBAC-UniImage-3B") as caught:
        outputs(ln.TBACLadderLoad, model=other, file=name, path="")
    assert name in str(caught.value)


def test_load_node_reruns_when_the_file_changes(output_dir, a_all, b_all):
    assert ln.TBACLadderLoad.fingerprint_inputs(file="look_00001_.safetensors", path="") == "missing"
    (name,) = _save(a_all, "look")["result"]
    before = ln.TBACLadderLoad.fingerprint_inputs(file=name, path="")
    assert before != "missing" and before == ln.TBACLadderLoad.fingerprint_inputs(file=name, path="")
    path = output_dir / "tbac_ladder" / name
    ladder_ops.save_conditioning(ladder_ops.mix(a_all, b_all, "fade"), path, overwrite=True)
    os.utime(path, ns=(1, 1))
    assert ln.TBACLadderLoad.fingerprint_inputs(file=name, path="") != before


# -- a graph: encode -> save, then load -> sample equals sampling the encode directly -------------------
def test_saved_conditioning_samples_like_the_original_in_a_graph(output_dir, tmp_path, fixture_root, monkeypatch):
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(make_models_root(tmp_path / "models" / "tbac", fixture_root)))
    recorder = Recorder()
    classes = dict(NODE_CLASSES)
    classes.update(make_core_doubles(tmp_path, recorder))
    runner = GraphRunner(classes)
    loader = {"class_type": "TBACModelLoader",
              "inputs": {"checkpoint": "tbac-tiny", "dtype": "fp32", "device": "cpu", "adapter": "none"}}
    encode = {"class_type": "TBACLadderEncode",
              "inputs": {"model": ["1", 0], "prompt": PROMPT_A, "negative_prompt": "", "layers": "default",
                         "keep_all_rungs": True, "one_prompt_per_line": False}}
    weight = {"class_type": "TBACLadderWeight", "inputs": {"conditioning": ["2", 0], "weights": "0-1:1.2, 2-3:0.5"}}

    def render(conditioning_link, extra):
        return {"1": loader, "2": encode, "3": weight, **extra,
                "5": {"class_type": "TBACSampler",
                      "inputs": {"model": ["1", 0], "conditioning": conditioning_link, "seed": 3, "steps": 2,
                                 "guidance": 4.5, "image_guidance": 1.5, "width": 64, "height": 64, "batch_size": 1,
                                 "sampler": "dpm++", "denoise": 1.0}},
                "6": {"class_type": "TBACDecode", "inputs": {"model": ["1", 0], "latent": ["5", 0], "tiling": "auto"}},
                "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}

    saved = runner.run({"1": loader, "2": encode, "3": weight,
                        "4": {"class_type": "TBACLadderSave", "inputs": {"conditioning": ["3", 0],
                                                                         "filename_prefix": "graph"}}})
    assert saved.outputs["4"] == ("graph_00001_.safetensors",)
    runner.run(render(["3", 0], {}))
    direct = recorder.images["7"]
    load = {"class_type": "TBACLadderLoad", "inputs": {"model": ["1", 0], "file": "graph_00001_.safetensors", "path": ""}}
    runner.run(render(["4", 0], {"4": load}))
    assert torch.equal(recorder.images["7"], direct)
