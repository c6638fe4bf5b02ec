"""The MLLM's image features: each distinct input image through the vision tower once, same conditioning.

An edit shows its input image in two guidance rows (image-only, full) and a black image in the
third: the tower runs twice (black, input), not three times, one image per call.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core.modeling.mllm import (
    _capture_rungs,
    _StopForward,
    image_features,
    metaquery_rung_states,
    rope_position_ids,
    vision_tower,
)
from tbac_core.processing.prompt_layout import conditioning_rows, metaquery_positions


@pytest.fixture(scope="module")
def edit_batch(pipe):
    model = pipe.model
    image = Image.new("RGB", (64, 48), (80, 120, 200))
    image.paste((250, 20, 20), (10, 10, 30, 30))
    rows = conditioning_rows(model.prompts, ["make it blue", "add a hat"], [[image], [image]], "")
    return model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())


def _stock_features(mllm, batch):
    output = vision_tower(mllm)(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_each_distinct_image_runs_the_vision_tower_once(pipe, edit_batch):
    mllm = pipe.model.mllm
    calls = []
    handle = vision_tower(mllm).register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs.get("grid_thw", args[1] if len(args) > 1 else None).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            ours = image_features(mllm, edit_batch["pixel_values"], edit_batch["image_grid_thw"])
    finally:
        handle.remove()
    assert edit_batch["image_grid_thw"].shape[0] == 6  # 2 prompts x (black, input, input)
    assert calls == [1, 1]  # the black image and the input image, each alone
    with torch.no_grad():
        stock = _stock_features(mllm, edit_batch)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_metaquery_states_equal_the_stock_forward_with_pixels(pipe, edit_batch):
    """Image features scattered into the input embeddings = the model's own pixel_values path."""
    model = pipe.model
    positions = metaquery_positions(edit_batch["input_ids"], model.prompts.ids, model.config.num_metaqueries)
    rungs = list(range(model.identity.num_rungs - 1))
    with torch.no_grad():
        ours = metaquery_rung_states(model.mllm, edit_batch, positions, rungs, model.prompts.ids.image_pad)
        store = {}
        position_ids = rope_position_ids(model.mllm, edit_batch["input_ids"], edit_batch["attention_mask"],
                                         edit_batch["image_grid_thw"], model.prompts.ids.image_pad)
        with _capture_rungs(model.mllm, rungs, positions, store):
            try:
                model.mllm(input_ids=edit_batch["input_ids"], attention_mask=edit_batch["attention_mask"],
                           position_ids=position_ids, pixel_values=edit_batch["pixel_values"],
                           image_grid_thw=edit_batch["image_grid_thw"], use_cache=False)
            except _StopForward:
                pass
    stock = torch.stack([store[r] for r in rungs])
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
