"""What the demo's tiny Qwen2.5-VL is taught to understand: questions about the synthetic scenes.

Each ``Conversation`` is one chat turn as Qwen2.5-VL sees it (system prompt, the user's images and
text) with the exact answer it must give. The same conversations serve three purposes:

* pretraining the MLLM with its own language-modelling loss (``demo.pretrain``), before it is
  frozen as TBAC freezes Qwen;
* scoring understanding on held-out scenes (``demo.evaluate``);
* shaping what the frozen MLLM holds at the metaquery positions: the TBAC generation prompt
  (TBAC's system prompt, the caption or the input image + instruction, then ``assistant\\n``) is
  taught to continue with the caption of the image to draw, so the hidden states right where the
  metaqueries sit already describe the target scene.

Questions use the understanding presets' exact wording (``describe in detail``, ``short caption``)
and three attribute questions; answers use the caption words only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .components import TBAC_SYSTEM_PROMPT
from .scenes import (
    EDIT_KINDS,
    SHAPES,
    UNKNOWN,
    Layout,
    Scene,
    draw_shape,
    edit_instruction,
    edit_target,
    render_scene,
    snap_colours,
)

CENTRED = Layout()  # the centred layout the evaluation renders
QWEN_SYSTEM = None  # Qwen2.5-VL's default system prompt (what ``understand`` uses)
DESCRIBE = "Describe this image in detail."  # the "describe in detail" preset
SHORT_CAPTION = "Write a short caption for this image, in one sentence."  # the "short caption" preset
SHAPE_COLOUR = "What colour is the shape?"
SHAPE = "What shape is it?"
BACKGROUND = "What colour is the background?"
IMAGE_QUESTIONS = (DESCRIBE, SHORT_CAPTION, SHAPE_COLOUR, SHAPE, BACKGROUND)
SHAPE_DRILL_SHARE = 0.2  # of the pretraining conversations: ``shape_drill``


def answer_for(question: str, scene: Scene) -> str:
    """The exact answer to one of ``IMAGE_QUESTIONS`` about ``scene``."""
    if question in (DESCRIBE, SHORT_CAPTION):
        return scene.caption()
    if question == SHAPE_COLOUR:
        return scene.colour
    if question == SHAPE:
        return scene.shape
    if question == BACKGROUND:
        return scene.background
    raise ValueError(f"Not a demo question: {question!r}; known: {IMAGE_QUESTIONS}.")


def question_sentences() -> list[str]:
    """Every question text, for the tokenizer (each of their words becomes one token)."""
    return list(IMAGE_QUESTIONS) + [". " + q for q in (SHAPE_COLOUR, SHAPE, BACKGROUND)]


@dataclass(frozen=True)
class Conversation:
    system: str | None  # None: Qwen2.5-VL's default
    text: str
    images: tuple[Image.Image, ...]
    answer: str


def image_question(scene: Scene, question: str, size: int, layout: Layout = CENTRED) -> Conversation:
    return Conversation(QWEN_SYSTEM, question, (render_scene(scene, size, layout),), answer_for(question, scene))


def text_question(scene: Scene, question: str) -> Conversation:
    """A question about a caption (no image): the text path learns the attributes too."""
    return Conversation(QWEN_SYSTEM, f"{scene.caption()}. {question}", (), answer_for(question, scene))


def generation_prompt(scene: Scene) -> Conversation:
    """TBAC's text-to-image prompt, continued with the caption of the image to draw."""
    return Conversation(TBAC_SYSTEM_PROMPT, scene.caption(), (), scene.caption())


def edit_prompt(source: Scene, target: Scene, size: int, layout: Layout = CENTRED,
                system: str | None = TBAC_SYSTEM_PROMPT) -> Conversation:
    """TBAC's edit prompt (input image + instruction), continued with the caption of the result."""
    return Conversation(system, edit_instruction(source, target), (render_scene(source, size, layout),),
                        target.caption())


def off_palette_pair(rng: random.Random, min_distance: float = 120.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two random RGB colours, each one no palette colour would be measured as (``snap_colours``
    says ``unknown``), at least ``min_distance`` apart (a visible shape on its background)."""
    while True:
        fill, background = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if (snap_colours(np.array([fill, background])) == [UNKNOWN, UNKNOWN]
                and sum((a - b) ** 2 for a, b in zip(fill, background)) >= min_distance ** 2):
            return fill, background


def shape_drill(size: int, rng: random.Random, layout: Layout = CENTRED) -> Conversation:
    """"What shape is it?" about a shape in random off-palette colours.

    Without it the tiny model learns the 144 training scenes as wholes and names a held-out scene
    after the training scene with the same two colours (wrong shape). Random colours are no
    (colour, shape, background) combination of the palette, so no held-out scene leaks in, and the
    vision tower must see the shape's form whatever its colours.
    """
    shape = rng.choice(SHAPES)
    fill, background = off_palette_pair(rng)
    return Conversation(QWEN_SYSTEM, SHAPE, (draw_shape(shape, fill, background, size, layout),), shape)


def random_conversation(scenes: list[Scene], size: int, rng: random.Random) -> Conversation:
    """One pretraining conversation about a random scene of ``scenes`` (edit targets among them too)."""
    scene = rng.choice(scenes)
    layout = Layout.random(rng)
    task = rng.random()
    if task < SHAPE_DRILL_SHARE:
        return shape_drill(size, rng, layout)
    task = (task - SHAPE_DRILL_SHARE) / (1 - SHAPE_DRILL_SHARE)  # the tasks below share the rest
    if task < 0.55:
        return image_question(scene, rng.choice(IMAGE_QUESTIONS), size, layout)
    if task < 0.7:
        return text_question(scene, rng.choice((SHAPE_COLOUR, SHAPE, BACKGROUND)))
    if task < 0.8:
        return generation_prompt(scene)
    allowed = set(scenes)
    while True:
        target = edit_target(scene, rng.choice(EDIT_KINDS), rng)
        if target in allowed:
            system = QWEN_SYSTEM if rng.random() < 0.25 else TBAC_SYSTEM_PROMPT
            return edit_prompt(scene, target, size, layout, system)
        scene = rng.choice(scenes)
