"""The built-in demo model: format, size, its three jobs on unseen combinations, reproducible build."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tbac_core.demo import DEMO_CHECKPOINT, DEMO_DEFAULTS, demo_defaults
from tbac_core.demo.components import DemoSpec
from tbac_core.demo.evaluate import (
    held_out_edit_pairs,
    score_edits,
    score_held_out,
    score_understanding,
)
from tbac_core.demo.questions import IMAGE_QUESTIONS, question_sentences
from tbac_core.demo.scenes import (
    COLOURS,
    SHAPES,
    Layout,
    Scene,
    all_scenes,
    load_split,
    measure_scene,
    measure_shape,
    render_scene,
    scene_matches,
    vocabulary,
)

MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def demo_pipe():
    from tbac_core import TBACPipeline

    return TBACPipeline.from_pretrained(DEMO_CHECKPOINT, device="cpu", dtype="fp32")


def test_checkpoint_is_small_and_in_the_official_format():
    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "tbacuniimage"
    for key in ("mllm_id", "diffusion_model_id", "vae_id", "scheduler_id"):
        assert not config[key].startswith(("/", "..")) and (DEMO_CHECKPOINT / config[key]).is_dir(), key
    assert (DEMO_CHECKPOINT / config["mllm_id"] / "preprocessor_config.json").is_file()
    assert (DEMO_CHECKPOINT / config["mllm_id"] / "tokenizer.json").is_file()
    for part in ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (DEMO_CHECKPOINT / config["diffusion_model_id"] / part).is_file()
    total = sum(p.stat().st_size for p in DEMO_CHECKPOINT.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"demo checkpoint is {total} bytes"
    assert demo_defaults() == {**DEMO_DEFAULTS, **config["demo_defaults"]}
    assert not list(DEMO_CHECKPOINT.rglob("*.bin")) and not list(DEMO_CHECKPOINT.rglob("*.pt"))


def test_demo_model_loads_with_its_sizes(demo_pipe):
    model = demo_pipe.model
    assert model.config.default_image_size == DEMO_DEFAULTS["width"] == 32
    assert model.identity.num_rungs == 7 and model.identity.num_dit_blocks == 4
    assert model.default_block_rungs() == [2, 3, 4, 5]


def test_every_caption_word_is_one_token(demo_pipe):
    builder = demo_pipe.model.prompts
    for word in sorted(vocabulary()):  # captions and edit instructions
        assert len(builder.text_ids(" " + word)) == 1, word
        assert len(builder.text_ids(word)) == 1, word
    assert len(builder.text_ids("a red circle on a blue background")) == 7


def test_every_question_word_is_one_token(demo_pipe):
    builder = demo_pipe.model.prompts
    for sentence in question_sentences():  # each question word (and its punctuation) is one token
        assert len(builder.text_ids(sentence)) == len(sentence.replace("?", " ?").replace(".", " .").replace(",", " ,").split())


def test_held_out_combinations_were_never_trained():
    train, held_out = load_split(DEMO_CHECKPOINT / "split.json")
    assert len(held_out) >= 20 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(all_scenes())
    trained_words = {w for s in train for w in (s.colour, s.shape, s.background)}
    assert trained_words == set(COLOURS) | set(SHAPES)  # new combinations of known words only


def test_held_out_prompts_get_the_right_colours(demo_pipe):
    """>= 90 % of unseen colour/shape/background prompts: both colours right (pixel measure)."""
    score = score_held_out(DEMO_CHECKPOINT, pipe=demo_pipe, seeds=(0,))
    print("held-out colour score:", score.summary())
    assert score.total >= 20
    assert score.fraction >= 0.9, [row for row in score.rows if not row["ok"]]


def test_held_out_scenes_are_understood(demo_pipe):
    """>= 90 % exact captions and answers (colour of shape, shape, background) on unseen scenes."""
    _, held_out = load_split(DEMO_CHECKPOINT / "split.json")
    score = score_understanding(demo_pipe, held_out)
    print("held-out understanding:", score.summary())
    assert score.total == len(held_out) * len(IMAGE_QUESTIONS) >= 100
    assert score.fraction >= 0.9, [row for row in score.rows if not row["ok"]][:10]
    for row in score.rows:  # whatever the answer, no control characters reach the caller
        assert row["answer"].isprintable(), row


def test_held_out_edits_apply_the_instruction_and_keep_the_rest(demo_pipe):
    """Edits into unseen combinations: the named colour changes (>= 80 %), the other stays (>= 80 %)."""
    pairs = held_out_edit_pairs(DEMO_CHECKPOINT)
    assert len(pairs) >= 40 and {bool(s.colour != t.colour) for s, t in pairs} == {True, False}
    score = score_edits(demo_pipe, pairs)
    print("held-out edits:", score.summary(("applied", "kept", "shape_kept")))
    assert score.share("applied") >= 0.8, [row for row in score.rows if not row["applied"]]
    assert score.share("kept") >= 0.8, [row for row in score.rows if not row["kept"]]


def test_edit_pairs_target_unseen_combinations_from_trained_ones():
    train, held_out = load_split(DEMO_CHECKPOINT / "split.json")
    for source, target in held_out_edit_pairs(DEMO_CHECKPOINT):
        assert source in train and target in held_out
        changed = [source.colour != target.colour, source.shape != target.shape,
                   source.background != target.background]
        assert sum(changed) == 1 and not changed[1]


def test_colour_measure_is_exact_on_rendered_scenes_and_rejects_wrong_ones():
    rng = random.Random(0)
    for scene in all_scenes()[::5]:
        image = render_scene(scene, 32, Layout.random(rng))
        assert measure_scene(image) == (scene.background, scene.colour)
        assert measure_shape(image, scene.colour) == scene.shape
        wrong = Scene(scene.background, scene.shape, scene.colour)  # colours swapped
        assert not scene_matches(image, wrong)
    blank = render_scene(Scene("red", "circle", "blue"), 32, Layout(scale=0.0))
    assert measure_scene(blank) == ("blue", "blue")  # no shape: the centre shows the background


def test_build_is_reproducible(tmp_path):
    """Same seeds, same bytes (a tiny budget stands in for the real one)."""
    from tbac_core.demo.build import build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded CPU reductions are not bit-reproducible
    try:
        for name in ("a", "b"):
            build(tmp_path / name / "out", tmp_path / name / "work", spec=DemoSpec(), steps=3, batch_size=4,
                  learning_rate=1e-3, vae_steps=2, mllm_steps=2, mllm_batch_size=4, layers="default",
                  evaluate_after=False, images_per_scene=1, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.relative_to(tmp_path / "a" / "out") for p in (tmp_path / "a" / "out").rglob("*")
                   if p.is_file() and p.name != "demo_info.json")
    assert files and files == sorted(p.relative_to(tmp_path / "b" / "out") for p in (tmp_path / "b" / "out").rglob("*")
                                     if p.is_file() and p.name != "demo_info.json")
    for path in files:
        assert (tmp_path / "a" / "out" / path).read_bytes() == (tmp_path / "b" / "out" / path).read_bytes(), path
    names = {p.as_posix() for p in files}
    assert {"config.json", "model.safetensors", "split.json"} <= names
