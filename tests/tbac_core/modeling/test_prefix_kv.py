"""The system turn's keys/values, computed once and shared by every conditioning row (modeling/prefix_kv.py).

Each row runs only its tokens after the system turn, with the turn's cached keys/values: the
rung states equal the one-pass forward within float rounding, every row always runs this way (so
a row's result does not depend on what ran before), and the cache is recomputed when the prefix
or the decoder's weights change.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core import TBACPipeline
from tbac_core.modeling.mllm import metaquery_rung_states, text_model
from tbac_core.modeling.prefix_kv import PrefixKVCache, SharedPrefix, columns_after_prefix
from tbac_core.processing.prompt_layout import metaquery_positions

PROMPT = "a red cat on a blue chair"


def _image() -> Image.Image:
    image = Image.new("RGB", (64, 48), (80, 120, 200))
    image.paste((250, 20, 20), (10, 10, 30, 30))
    return image


ROW_SETS = {
    "one text row": lambda: [(PROMPT, [])],
    "rows of different lengths (left padding)": lambda: [("", []), (PROMPT + " next to a small green house", [])],
    "edit rows with images": lambda: [("make it blue", [_image()]), ("", [_image()]),
                                      ("", [Image.new("RGB", (64, 48))])],
}


def _rung_states(model, rows, shared_prefix=None):
    batch = model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
    positions = metaquery_positions(batch["input_ids"], model.prompts.ids, model.config.num_metaqueries)
    rungs = list(range(model.identity.num_rungs))
    return metaquery_rung_states(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad,
                                 shared_prefix=shared_prefix)


def _system_prefix(model, cache) -> SharedPrefix:
    return SharedPrefix(tuple(model.prompts.system_turn_ids(model.config.system_prompt)), cache)


@pytest.mark.parametrize("rows", list(ROW_SETS), ids=list(ROW_SETS))
def test_rows_after_the_cached_prefix_equal_the_one_pass_forward(pipe, rows):
    model = pipe.model
    row_list = ROW_SETS[rows]()
    cache = PrefixKVCache()
    whole = _rung_states(model, row_list)
    split = _rung_states(model, row_list, _system_prefix(model, cache))
    assert cache.computed == 1  # the prefix path ran (not the fallback)
    assert split.shape == whole.shape
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_the_prefix_runs_once_and_rows_never_depend_on_history(pipe):
    model = pipe.model
    cache = PrefixKVCache()
    prefix = _system_prefix(model, cache)
    first = _rung_states(model, [(PROMPT, [])], prefix)
    _rung_states(model, [("", []), ("something else entirely", [])], prefix)
    again = _rung_states(model, [(PROMPT, [])], prefix)
    assert (cache.computed, cache.reused) == (1, 2)
    assert torch.equal(first, again)  # from the cache or freshly computed: the same bits
    fresh = _rung_states(model, [(PROMPT, [])], _system_prefix(model, PrefixKVCache()))
    assert torch.equal(first, fresh)


def test_encodes_share_the_model_prefix_cache(checkpoint_dir):
    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    cache = pipe.model.system_prefix_kv
    pipe.encode_prompt(PROMPT)  # a negative row and a prompt row
    assert (cache.computed, cache.reused) == (1, 1)
    pipe.encode_prompt("make it blue", images=[_image()])
    assert cache.computed == 1 and cache.reused > 1


def test_a_weight_change_or_another_prefix_recomputes_the_keys_values(checkpoint_dir):
    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    model = pipe.model
    cache = PrefixKVCache()
    prefix = _system_prefix(model, cache)
    before = _rung_states(model, [(PROMPT, [])], prefix)
    layer = text_model(model.mllm).layers[0]
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(1.5)  # in place: same tensor, same storage, new version
    after = _rung_states(model, [(PROMPT, [])], prefix)
    assert cache.computed == 2
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _rung_states(model, [(PROMPT, [])]), rtol=1e-5,
                               atol=1e-5 * float(after.abs().max()))
    other = SharedPrefix(tuple(model.prompts.system_turn_ids("Another system prompt.")), cache)
    batch = model.prompts.build_batch([(PROMPT, [])], "Another system prompt.", model.metaquery_suffix())
    positions = metaquery_positions(batch["input_ids"], model.prompts.ids, model.config.num_metaqueries)
    metaquery_rung_states(model.mllm, batch, positions, [0, 1], model.prompts.ids.image_pad, shared_prefix=other)
    assert cache.computed == 3


def test_rows_not_starting_with_the_prefix_run_whole(pipe):
    model = pipe.model
    cache = PrefixKVCache()
    wrong = SharedPrefix(tuple(model.prompts.system_turn_ids("Not the system prompt of these rows.")), cache)
    states = _rung_states(model, [(PROMPT, [])], wrong)
    assert cache.computed == 0
    assert torch.equal(states, _rung_states(model, [(PROMPT, [])]))


def test_columns_after_prefix():
    prefix = (7, 8, 9)
    # row 0: no padding; row 1: two pads (id 0) on the left
    ids = torch.tensor([[7, 8, 9, 1, 2, 3], [0, 0, 7, 8, 9, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    columns = columns_after_prefix(ids, mask, prefix)
    assert columns.tolist() == [[3, 4, 5], [0, 1, 5]]
    assert ids.gather(1, columns).tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.gather(1, columns).tolist() == [[1, 1, 1], [0, 0, 1]]
    assert columns_after_prefix(ids, mask, (7, 8, 5)) is None  # a row without the prefix
    assert columns_after_prefix(ids, mask, ()) is None
    right_padded = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert columns_after_prefix(torch.tensor([[7, 8, 9, 1, 0, 0], [7, 8, 9, 1, 2, 3]]), right_padded, prefix) is None
    only_prefix = torch.tensor([[0, 0, 0, 7, 8, 9], [7, 8, 9, 1, 2, 3]])
    assert columns_after_prefix(only_prefix, torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6]), prefix) is None
