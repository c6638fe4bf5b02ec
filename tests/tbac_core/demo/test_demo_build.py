"""The demo build command end to end in miniature (a few steps), and its MLLM pretraining data."""
from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest
import torch

from tbac_core.demo.build import demo_prompt_builder, main, write_components
from tbac_core.demo.components import DemoSpec
from tbac_core.demo.pretrain import IGNORE, conversation_batch
from tbac_core.demo.questions import (
    DESCRIBE,
    SHAPE,
    edit_prompt,
    generation_prompt,
    image_question,
    off_palette_pair,
    random_conversation,
    shape_drill,
    text_question,
)
from tbac_core.demo.scenes import SHAPES, UNKNOWN, Layout, Scene, all_scenes, edit_instruction, snap_colours


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    folder = tmp_path_factory.mktemp("components")
    write_components(folder, DemoSpec())
    return folder


def test_pretraining_labels_are_the_answer_and_its_end_token(components):
    builder = demo_prompt_builder(components)
    scene, other = Scene("red", "circle", "blue"), Scene("green", "circle", "blue")
    conversations = [image_question(scene, DESCRIBE, 32), image_question(scene, SHAPE, 32),
                     text_question(scene, SHAPE), generation_prompt(scene), edit_prompt(scene, other, 32)]
    batch = conversation_batch(builder, conversations)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3  # 32x32 -> 112x112 px -> 16 visual tokens
    tokenizer = builder.tokenizer
    for row, conversation in enumerate(conversations):
        labels = batch["labels"][row]
        assert tokenizer.decode(labels[labels != IGNORE]) == conversation.answer + "<|im_end|>"
        # supervised tokens are the last ones of the row (left padding), never padding or the prompt
        supervised = (labels != IGNORE).nonzero().flatten()
        assert supervised.tolist() == list(range(len(labels) - len(supervised), len(labels)))
    assert conversations[-1].text == edit_instruction(scene, other) == "make the circle green"
    assert conversations[-1].answer == other.caption()


def test_random_conversations_stay_within_the_given_scenes():
    scenes = all_scenes()[:20]
    rng = random.Random(0)
    for _ in range(200):
        conversation = random_conversation(scenes, 32, rng)
        words = set(conversation.answer.split())
        assert words <= set(" ".join(s.caption() for s in scenes).split()) | {"circle", "square", "triangle"}


def test_build_command_makes_a_model_that_does_all_three_jobs(tmp_path):
    """``python -m tbac_core.demo.build`` with a tiny budget: a loadable model; each job runs."""
    from tbac_core import TBACPipeline
    from tbac_core.pipeline.understanding import GenerationSettings, answer

    out = tmp_path / "out"
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        assert main(["--out", str(out), "--work", str(tmp_path / "work"), "--steps", "2", "--batch-size", "4",
                     "--mllm-steps", "2", "--mllm-batch-size", "4", "--vae-steps", "2", "--images-per-scene", "1",
                     "--no-eval"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    config = json.loads((out / "config.json").read_text())
    assert config["input_image_pixels"] == DemoSpec().vision_pixels == 112 * 112 and config["demo_defaults"]["layers"] == "default"
    info = json.loads((out / "demo_info.json").read_text())
    assert info["training"]["mllm_steps"] == 2 and info["timings"]["total_cpu_seconds"] > 0
    assert info["training"]["vae_from"] is None and info["training"]["mllm_from"] is None
    pipe = TBACPipeline.from_pretrained(out, device="cpu", dtype="fp32")
    source = pipe.generate("a red circle on a blue background", steps=2).images[0]
    assert source.size == (32, 32)
    assert pipe.edit("make the circle green", [[source]], steps=2).images[0].size == (32, 32)
    text = answer(pipe, DESCRIBE, source, settings=GenerationSettings(max_new_tokens=8))
    assert isinstance(text, str) and not [ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\n\t"]

    # A second build taking both stages' weights from the first records them by name and hash.
    from tbac_core.demo.build import PRETRAINED_FILE

    again = tmp_path / "again"
    try:
        assert main(["--out", str(again), "--work", str(tmp_path / "work2"), "--steps", "2", "--batch-size", "4",
                     "--vae-from", str(out), "--mllm-from", str(tmp_path / "work" / PRETRAINED_FILE),
                     "--images-per-scene", "1", "--no-eval"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    training = json.loads((again / "demo_info.json").read_text())["training"]
    assert training["vae_from"]["folder"] == "out" and training["mllm_from"]["folder"] == PRETRAINED_FILE
    assert all(len(training[k]["weights_sha256"]) == 64 for k in ("vae_from", "mllm_from"))


def test_shape_drills_use_off_palette_colours_only():
    """The drills teach the form of a shape whatever its colours, and never show a palette scene
    (held-out combinations stay out of every job)."""
    rng = random.Random(0)
    shapes = set()
    for _ in range(100):
        conversation = shape_drill(32, rng, Layout.random(rng))
        pixels = np.asarray(conversation.images[0])  # [32, 32, 3]
        assert conversation.text == SHAPE and conversation.answer in SHAPES
        assert snap_colours(np.stack([pixels[0, 0], pixels[16, 16]])) == [UNKNOWN, UNKNOWN]  # background, shape
        shapes.add(conversation.answer)
    assert shapes == set(SHAPES)


def test_off_palette_pairs_are_far_from_the_palette_and_each_other():
    rng = random.Random(1)
    for _ in range(200):
        fill, background = off_palette_pair(rng)
        assert snap_colours(np.array([fill, background])) == [UNKNOWN, UNKNOWN]
        assert np.linalg.norm(np.subtract(fill, background)) >= 120


def test_taken_weights_are_recorded_by_name_and_hash_not_by_path():
    """demo_info.json names where ``--vae-from`` weights came from in terms that mean something on
    another machine; the shipped demo's record matches the DC-AE weights it holds."""
    from pathlib import Path

    from tbac_core.demo import DEMO_CHECKPOINT
    from tbac_core.demo.build import read_vae_state, taken_weights_record

    state = read_vae_state(DEMO_CHECKPOINT)
    record = taken_weights_record(Path("/somewhere/on/my/machine/vae"), state)
    assert record["folder"] == "vae" and "/" not in json.dumps(record)
    assert taken_weights_record(Path("vae"), dict(reversed(list(state.items())))) == record  # key order
    changed = {**state, next(iter(state)): next(iter(state.values())) + 1}
    assert taken_weights_record(Path("vae"), changed) != record
    assert taken_weights_record(None, state) is None
    info = json.loads((Path(DEMO_CHECKPOINT) / "demo_info.json").read_text())
    assert info["training"]["vae_from"] == record
