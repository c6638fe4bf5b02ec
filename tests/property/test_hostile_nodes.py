"""Hostile inputs at the node boundary: each V3 node's execute ends in a result or the pack's own TBACError."""
from __future__ import annotations

import pytest
import torch
from hostile import (
    HOSTILE,
    bounded,
    hostile_number,
    hostile_seed,
    hostile_text,
    not_text,
)
from hypothesis import example, given
from hypothesis import strategies as st
from pack import PACK, outputs

bridge = PACK.nodes.comfy_bridge
generate = PACK.nodes.generate
understand = PACK.nodes.understand
ladder_nodes = PACK.nodes.ladder
OURS = (PACK.tbac_core.errors.TBACError,)
MAX_INPUT_IMAGES = PACK.tbac_core.params.MAX_INPUT_IMAGES

IMAGE_BATCHES = {  # what a ComfyUI IMAGE input can carry, wired from any node
    "empty": lambda: torch.zeros(0, 32, 32, 3),
    "bf16": lambda: torch.rand(1, 32, 32, 3).bfloat16(),
    "fp16": lambda: torch.rand(2, 32, 32, 3).half(),
    "int": lambda: torch.randint(0, 255, (1, 32, 32, 3)),
    "0x0": lambda: torch.zeros(1, 0, 0, 3),
    "1xN": lambda: torch.rand(1, 1, 64, 3),
    "NaN": lambda: torch.full((1, 32, 32, 3), float("nan")),
    "4 channels": lambda: torch.rand(1, 32, 32, 4),
    "video frames": lambda: torch.rand(MAX_INPUT_IMAGES * 4, 16, 16, 3),
    "3-D": lambda: torch.rand(32, 32, 3),
}
batch = st.sampled_from(sorted(IMAGE_BATCHES))


@pytest.fixture(scope="module")
def model(pipe):
    return bridge.ManagedModel(pipe.model, bridge.devices_for("cpu"), "tbac-tiny")


@pytest.fixture(scope="module")
def cond(pipe):
    return pipe.encode("a red square")


@HOSTILE
@given(prompt=st.one_of(hostile_text, not_text), layers=st.one_of(hostile_text, not_text),
       images=st.one_of(st.none(), batch), per_line=st.booleans())
@example(prompt="x", layers="default", images="empty", per_line=False)
@example(prompt="x", layers="default", images="video frames", per_line=False)
@example(prompt="x", layers="default", images="bf16", per_line=False)
@example(prompt="\n".join(["x"] * 100), layers="default", images=None, per_line=True)
@example(prompt=None, layers="default", images=None, per_line=False)
def test_ladder_encode(model, prompt, layers, images, per_line):
    image = None if images is None else IMAGE_BATCHES[images]()
    bounded(lambda: outputs(generate.TBACLadderEncode, model=model, prompt=prompt, negative_prompt="",
                            layers=layers, keep_all_rungs=False, one_prompt_per_line=per_line, images=image), OURS)


@HOSTILE
@given(images=batch, crop=st.booleans())
@example(images="empty", crop=True)
@example(images="empty", crop=False)
@example(images="bf16", crop=True)
def test_encode_image(model, images, crop):
    bounded(lambda: outputs(generate.TBACEncodeImage, model=model, images=IMAGE_BATCHES[images](),
                            crop_to_multiple=crop), OURS)


LATENTS = {
    "empty": lambda c: {"samples": torch.zeros(0, c, 1, 1)},
    "no samples": lambda c: {},
    "wrong channels": lambda c: {"samples": torch.zeros(1, 4, 8, 8)},
    "NaN": lambda c: {"samples": torch.full((1, c, 1, 1), float("nan"))},
    "not a dict": lambda c: torch.zeros(1, c, 1, 1),
    "ok": lambda c: {"samples": torch.zeros(1, c, 1, 1)},
}


@HOSTILE
@given(latent=st.sampled_from(sorted(LATENTS)), originals=st.one_of(st.none(), batch))
@example(latent="empty", originals=None)
@example(latent="ok", originals="empty")
def test_decode(model, latent, originals):
    image = None if originals is None else IMAGE_BATCHES[originals]()
    channels = model.pipeline.model.latent_channels
    bounded(lambda: outputs(generate.TBACDecode, model=model, latent=LATENTS[latent](channels), tiling="auto",
                            original_images=image), OURS)


@HOSTILE
@given(seed=hostile_seed, steps=hostile_number, guidance=hostile_number, size=hostile_number)
@example(seed=True, steps=1, guidance=4.5, size=32)
@example(seed=1.5, steps=1, guidance=4.5, size=32)
@example(seed=2**80, steps=1, guidance=4.5, size=32)
def test_sampler(model, cond, seed, steps, guidance, size):
    bounded(lambda: outputs(generate.TBACSampler, model=model, conditioning=cond, seed=seed, steps=steps,
                            guidance=guidance, image_guidance=1.5, width=size, height=32, batch_size=1,
                            sampler="euler", denoise=1.0), OURS)


@HOSTILE
@given(question=st.one_of(hostile_text, not_text), images=st.one_of(st.none(), batch), seed=hostile_seed)
@example(question="\ud800", images=None, seed=0)
@example(question="what?", images="video frames", seed=0)
@example(question="what?", images="empty", seed=0)
def test_understand(model, question, images, seed):
    image = None if images is None else IMAGE_BATCHES[images]()
    preset = next(iter(PACK.tbac_core.pipeline.PRESETS))
    bounded(lambda: outputs(understand.TBACUnderstand, model=model, preset=preset, question=question,
                            max_new_tokens=2, do_sample=False, temperature=0.7, top_p=0.9, top_k=50,
                            repetition_penalty=1.05, seed=seed, images=image), OURS)


@HOSTILE
@given(prefix=st.one_of(hostile_text, st.sampled_from(["a\x00b", "x" * 400, "../../escape", "/abs", "sub/" * 50 + "n",
                                                       "a/\x00/b", "..", "con/aux"])))
@example(prefix="a\x00b")
@example(prefix="x" * 400)
@example(prefix="../../escape")
def test_ladder_save(cond, prefix, tmp_path_factory, monkeypatch):
    monkeypatch.setenv(bridge.OUTPUT_DIR_ENV, str(tmp_path_factory.mktemp("output")))
    bounded(lambda: outputs(ladder_nodes.TBACLadderSave, conditioning=cond, filename_prefix=prefix), OURS)


@HOSTILE
@given(path=st.one_of(hostile_text, st.sampled_from(["a\x00.safetensors", "x" * 400 + ".safetensors", "/dev/zero",
                                                     "/dev/null.safetensors", "../../etc/passwd.safetensors"])))
@example(path="a\x00.safetensors")
@example(path="x" * 400 + ".safetensors")
def test_ladder_load(model, path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv(bridge.OUTPUT_DIR_ENV, str(tmp_path_factory.mktemp("output")))
    bounded(lambda: outputs(ladder_nodes.TBACLadderLoad, model=model, file=ladder_nodes.NO_FILE, path=path), OURS)
