"""Hostile inputs for the library's public entry points: a result or a TBACError with a message, never
a raw built-in exception, a hang or unbounded memory (``tests/support/hostile.py``)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hostile import (
    HOSTILE,
    bounded,
    hostile_json_value,
    hostile_number,
    hostile_seed,
    hostile_text,
    nested_json,
    not_text,
)
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from tbac_core.errors import TBACError
from tbac_core.ladder import mix, select_layers, weight_blocks
from tbac_core.loading import load_model
from tbac_core.params import MAX_INPUT_IMAGES

OURS = (TBACError,)
SMALL = {"steps": 1, "width": 32, "height": 32}

IMAGES = {
    "bf16 batch": lambda: torch.rand(1, 32, 32, 3).bfloat16(),
    "fp16 frame": lambda: torch.rand(32, 32, 3).half(),
    "int32 frame": lambda: torch.randint(0, 255, (32, 32, 3), dtype=torch.int32),
    "int64 huge values": lambda: torch.full((32, 32, 3), 10**12),
    "bool frame": lambda: torch.ones(32, 32, 3, dtype=torch.bool),
    "complex frame": lambda: torch.ones(32, 32, 3, dtype=torch.complex64),
    "empty batch": lambda: torch.zeros(0, 32, 32, 3),
    "0x0 PIL": lambda: Image.new("RGB", (0, 0)),
    "1xN PIL": lambda: Image.new("RGB", (1, 90)),
    "Nx1 array": lambda: np.zeros((1, 90, 3), np.uint8),
    "1x1 palette": lambda: Image.new("P", (1, 1)),
    "NaN frame": lambda: torch.full((32, 32, 3), float("nan")),
    "5 channels": lambda: torch.rand(32, 32, 5),
    "5-D tensor": lambda: torch.rand(1, 1, 32, 32, 3),
    "object array": lambda: np.array([["a", "b"]], dtype=object),
    "string": lambda: "image.png",
    "too many frames": lambda: torch.rand(MAX_INPUT_IMAGES + 1, 8, 8, 3),
    "nested empty": lambda: [[]],
    "huge aspect": lambda: np.zeros((1, 400, 3), np.uint8),
    "16-bit PIL": lambda: Image.new("I;16", (40, 40)),
}
image_case = st.sampled_from(sorted(IMAGES))
prompt = st.one_of(hostile_text, not_text, st.lists(st.one_of(hostile_text, not_text), max_size=3))


@HOSTILE
@given(prompt=prompt, negative=st.one_of(hostile_text, not_text), seed=hostile_seed)
@example(prompt="a\ud800b", negative="", seed=0)
@example(prompt=None, negative="", seed=0)
@example(prompt="a", negative="\udfff", seed=True)
@example(prompt="a", negative="", seed=1.5)
@example(prompt="a", negative="", seed=2**70)
@example(prompt=["a"] * 1000, negative="", seed=0)
def test_generate(pipe, prompt, negative, seed):
    bounded(lambda: pipe.generate(prompt, negative, seed=seed, **SMALL), OURS)


@HOSTILE
@given(prompt=st.one_of(hostile_text, not_text), image=image_case, guidance=hostile_number)
@example(prompt="a", image="bf16 batch", guidance=1.5)
@example(prompt="a", image="empty batch", guidance=1.5)
@example(prompt="a", image="0x0 PIL", guidance=1.5)
@example(prompt="a", image="1xN PIL", guidance=1.5)
@example(prompt="a", image="complex frame", guidance=1.5)
@example(prompt="a", image="too many frames", guidance=1.5)
def test_edit(pipe, prompt, image, guidance):
    bounded(lambda: pipe.edit(prompt, IMAGES[image](), image_guidance_scale=guidance, **SMALL), OURS)


@HOSTILE
@given(prompt=st.one_of(hostile_text, not_text), image=image_case, layers=st.one_of(hostile_text, not_text))
def test_encode_prompt(pipe, prompt, image, layers):
    bounded(lambda: pipe.encode_prompt(prompt, images=IMAGES[image](), layers=layers), OURS)


@HOSTILE
@given(image=image_case)
@example(image="empty batch")
@example(image="bf16 batch")
@example(image="int32 frame")
def test_encode_image(pipe, image):
    bounded(lambda: pipe.encode_image(IMAGES[image]()), OURS)


LATENTS = {
    "empty batch": lambda c: torch.zeros(0, c, 1, 1),
    "wrong channels": lambda c: torch.zeros(1, c + 1, 1, 1),
    "NaN": lambda c: torch.full((1, c, 1, 1), float("nan")),
    "int": lambda c: torch.zeros(1, c, 1, 1, dtype=torch.int64),
    "3-D": lambda c: torch.zeros(c, 1, 1),
    "zero height": lambda c: torch.zeros(1, c, 0, 1),
    "bf16": lambda c: torch.zeros(1, c, 1, 1, dtype=torch.bfloat16),
    "a string": lambda c: "latents",
    "None": lambda c: None,
}


@HOSTILE
@given(case=st.sampled_from(sorted(LATENTS)))
@example(case="empty batch")
@example(case="a string")
@example(case="wrong channels")
def test_decode(pipe, case):
    bounded(lambda: pipe.decode(LATENTS[case](pipe.model.latent_channels)), OURS)


@HOSTILE
@given(question=st.one_of(hostile_text, not_text), system=st.one_of(st.none(), hostile_text, not_text),
       image=st.one_of(st.none(), image_case))
@example(question="\ud800", system=None, image=None)
@example(question="what?", system="\ud800", image=None)
@example(question=None, system=None, image=None)
@example(question="what?", system=None, image="too many frames")
@example(question="what?", system=None, image="empty batch")
def test_understand(pipe, question, system, image):
    from tbac_core.params import GenerationSettings
    from tbac_core.pipeline import answer

    images = None if image is None else IMAGES[image]()
    bounded(lambda: answer(pipe, question, images=images, system_prompt=system,
                           settings=GenerationSettings(max_new_tokens=2)), OURS)


@pytest.fixture(scope="module")
def cond(pipe):
    return pipe.encode_prompt(["a red square", "a blue circle"])


spec = st.one_of(hostile_text, not_text, st.lists(hostile_number, max_size=5),
                 st.sampled_from(["all", "last 2", "0:0.5", "1e309", "nan", "-1", "0-99", "default," * 40]))


@HOSTILE
@given(spec=spec, which=st.sampled_from(["select", "weight", "mix"]))
def test_ladder_ops_leave_their_input_unchanged(cond, spec, which):
    blocks, info = cond.blocks, dict(cond.info)
    ops = {"select": lambda: select_layers(cond, spec), "weight": lambda: weight_blocks(cond, spec),
           "mix": lambda: mix(cond, cond, spec)}
    bounded(ops[which], OURS)
    assert cond.blocks == blocks and cond.info == info  # the edits are pure


# -- files we read -------------------------------------------------------------------------------
CONFIG_VALUES = st.one_of(hostile_json_value(), st.sampled_from([-1, 0, 10**30, 1.5, "64", [], {}, None, True]))


@pytest.fixture(scope="module")
def config(checkpoint_dir):
    return json.loads((checkpoint_dir / "config.json").read_text())


def _hostile_checkpoint(tmp_path, checkpoint_dir, config_text: str, index: str | None = None):
    folder = tmp_path / "ckpt"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(checkpoint_dir, folder, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    for weights in checkpoint_dir.glob("*.safetensors"):
        (folder / weights.name).symlink_to(weights)
    (folder / "config.json").write_text(config_text)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(index)
    return folder


@HOSTILE
@given(data=st.data())
def test_load_model_on_hostile_configs(tmp_path, checkpoint_dir, config, data):
    key = data.draw(st.sampled_from(sorted(config)), label="key")
    value = data.draw(CONFIG_VALUES, label="value")
    text = json.dumps({**config, key: value})
    text = data.draw(st.sampled_from([text, nested_json(5000), "{", text[: len(text) // 2], "[]", "null"]))
    folder = _hostile_checkpoint(tmp_path, checkpoint_dir, text)
    bounded(lambda: load_model(folder, device="cpu", dtype="float32"), OURS)


@HOSTILE
@given(weight_map=st.one_of(hostile_json_value(), st.dictionaries(hostile_text, st.one_of(
    hostile_json_value(), st.sampled_from(["../model.safetensors", "/etc/passwd", "model.safetensors"])),
    max_size=3)))
def test_load_model_on_hostile_index_files(tmp_path, checkpoint_dir, config, weight_map):
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    folder = _hostile_checkpoint(tmp_path, checkpoint_dir, json.dumps(config), index)
    (folder / "model.safetensors").unlink()  # the index is what the loader reads
    bounded(lambda: load_model(folder, device="cpu", dtype="float32"), OURS)


@HOSTILE
@given(document=st.one_of(hostile_json_value().map(json.dumps), st.just(nested_json(10000)), hostile_text))
def test_load_conditioning_with_hostile_metadata(tmp_path, cond, pipe, document):
    from safetensors.torch import save_file

    from tbac_core.ladder import load_conditioning

    path = tmp_path / "c.safetensors"
    save_file({"source.0.positive": torch.zeros(1, 1)}, str(path), metadata={
        "tbac_format": "tbac-ladder-conditioning", "tbac_format_version": "1",
        "tbac_conditioning": document.encode("utf-8", "replace").decode("utf-8")})
    bounded(lambda: load_conditioning(path, expected=pipe.model.identity), OURS)


@HOSTILE
@given(body=st.one_of(hostile_json_value().map(json.dumps), st.just(nested_json(10000)), hostile_text),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]))
def test_rows_files(tmp_path, body, suffix):
    from tbac_core.io.rows import read_records

    path = tmp_path / f"rows{suffix}"
    path.write_bytes(body.encode("utf-8", "surrogatepass"))
    bounded(lambda: read_records(path), OURS)


@HOSTILE
@given(parameters=st.one_of(hostile_json_value().map(json.dumps), st.just(nested_json(10000)), hostile_text))
def test_png_metadata(tmp_path, parameters):
    from PIL import PngImagePlugin

    from tbac_core.io.pngmeta import read_parameters

    info = PngImagePlugin.PngInfo()
    for key in ("parameters", "tbac", "tbac_parameters"):
        info.add_text(key, parameters.encode("utf-8", "replace").decode("utf-8"))
    path = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    bounded(lambda: read_parameters(path), OURS)
