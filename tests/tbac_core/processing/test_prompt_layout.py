"""The prompt layout of one encode: guidance rows in branch order, the metaquery suffix and positions."""
from __future__ import annotations

import torch
from PIL import Image

from tbac_core.processing.images import images_per_prompt
from tbac_core.processing.prompt_layout import (
    black_like,
    conditioning_rows,
    metaquery_positions,
    metaquery_suffix,
)


def test_text_to_image_rows_share_one_negative_row(pipe):
    rows = conditioning_rows(pipe.model.prompts, ["a cat", "a dog"], None, "blurry")
    assert [text for text, _ in rows] == ["blurry", "a cat", "a dog"]
    assert all(images == [] for _, images in rows)


def test_edit_rows_are_black_then_images_then_prompts(pipe):
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    per_prompt = images_per_prompt([[red], [red, blue]], 2)
    rows = conditioning_rows(pipe.model.prompts, ["make it blue", "swap"], per_prompt, "")
    assert [text for text, _ in rows] == ["", "", "", "", "make it blue", "swap"]
    assert [len(images) for _, images in rows] == [1, 2, 1, 2, 1, 2]
    black = rows[1][1][1]
    assert black.size == blue.size and black.getextrema() == ((0, 0),) * 3
    assert rows[2][1][0] is rows[4][1][0]  # the same input image object in both branches: processed once
    assert rows[3][1][0] is rows[2][1][0]  # an image shared by two prompts too


def test_black_like_keeps_the_size():
    assert black_like(Image.new("RGB", (17, 5), (9, 9, 9))).size == (17, 5)


def test_suffix_and_positions(pipe):
    model = pipe.model
    ids, n = model.prompts.ids, model.config.num_metaqueries
    suffix = metaquery_suffix(ids, model.base_vocab, n)
    assert suffix[0] == ids.vision_start and suffix[-2:] == [ids.vision_end, ids.im_end]
    assert suffix[1:-2] == list(range(model.base_vocab, model.base_vocab + n))
    assert suffix == model.metaquery_suffix()
    row = torch.tensor([[ids.pad, 5, ids.vision_start, 7, ids.vision_end, *suffix]])
    assert metaquery_positions(row, ids, n).tolist() == [list(range(6, 6 + n))]
