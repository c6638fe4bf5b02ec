"""Rows that begin like an earlier row run only their columns after the shared prefix (modeling/prefix_kv.py).

The guidance pass keeps its source row's head (system turn, and an edit's input images) with its
keys/values; the prompt rows then skip what they share with it. Their states equal the whole-row
forward within float rounding, the skipped columns really are not run, and a prompt row's result
depends on its encode's inputs only, never on what ran before.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tbac_core import TBACPipeline
from tbac_core.modeling.mllm import metaquery_rung_states, metaquery_rung_states_keeping_head, text_model
from tbac_core.modeling.prefix_kv import RowPrefix, columns_after_prefix, shared_prefix_length
from tbac_core.processing.prompt_layout import conditioning_rows, metaquery_positions

PROMPT = "a red cat on a blue chair"


def _image(colour=(80, 120, 200), size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((250, 20, 20), (10, 10, 30, 30))
    return image


def _batch(model, rows):
    batch = model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
    positions = metaquery_positions(batch["input_ids"], model.prompts.ids, model.config.num_metaqueries)
    return batch, positions


def _guidance_head(model, rows, row, rungs):
    batch, positions = _batch(model, rows)
    return metaquery_rung_states_keeping_head(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad, row)


class _ColumnsRun:
    """Counts the columns the first decoder layer sees in each pass."""

    def __init__(self, model):
        self.columns: list[int] = []
        self._layer = text_model(model.mllm).layers[0]

    def __enter__(self):
        def record(module, args, kwargs):
            self.columns.append((args[0] if args else kwargs["hidden_states"]).shape[1])
        self._handle = self._layer.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _edit_rows(model, prompts, images):
    rows = conditioning_rows(model.prompts, prompts, images, "")
    batch = len(prompts)
    return rows[:2 * batch], rows[2 * batch:]  # guidance rows (black, input images), prompt rows


CASES = {
    "text-to-image, one prompt": (lambda m: ([("", [])], [(PROMPT, [])]), "system turn"),
    "text-to-image, prompts of different lengths": (
        lambda m: ([("", [])], [(PROMPT, []), (PROMPT + " next to a small green house at dusk", [])]), "system turn"),
    "edit, one prompt": (lambda m: _edit_rows(m, ["make it blue"], [[_image()]]), "head"),
    "edit, two prompts, one image": (lambda m: _edit_rows(m, ["make it blue", "add a hat"], [[_image()]] * 2), "head"),
    "edit, two prompts, other images": (
        lambda m: _edit_rows(m, ["make it blue", "add a hat"], [[_image()], [_image((20, 220, 20), (80, 64))]]),
        "system turn and user"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rows_after_the_shared_prefix_equal_the_whole_row_forward(pipe, case):
    model = pipe.model
    make_rows, expected = CASES[case]
    guidance_rows, prompt_rows = make_rows(model)
    rungs = list(range(model.identity.num_rungs))
    guidance_states, head = _guidance_head(model, guidance_rows, len(guidance_rows) - 1, rungs)
    batch, positions = _batch(model, prompt_rows)
    with torch.no_grad(), _ColumnsRun(model) as run:
        whole = metaquery_rung_states(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad)
        split = metaquery_rung_states(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad, prefix=head)
    guidance_batch, _ = _batch(model, guidance_rows)
    system_turn = model.prompts.head_length([], model.config.system_prompt)
    assert head.length == int(guidance_batch["head_lengths"][-1])
    skipped = run.columns[0] - run.columns[1]
    if expected == "system turn":
        assert skipped == system_turn == head.length
    elif expected == "head":
        assert skipped == head.length > system_turn + 64  # the input image's tokens too
    else:  # other images: the system turn, "user\n" and <|vision_start|>, not the image tokens
        assert system_turn < skipped < head.length
    assert split.shape == whole.shape
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    # The guidance pass that kept the head ran whole: its states are the plain forward's bits.
    with torch.no_grad():
        plain = metaquery_rung_states(model.mllm, guidance_batch, _batch(model, guidance_rows)[1], rungs,
                                      model.prompts.ids.image_pad)
    assert torch.equal(guidance_states, plain)


def test_a_prefix_kept_for_shallower_rungs_or_another_dtype_is_not_used(pipe):
    model = pipe.model
    _, head = _guidance_head(model, [("", [])], 0, [0, 1])  # one decoder layer kept
    batch, positions = _batch(model, [(PROMPT, [])])
    rungs = list(range(model.identity.num_rungs))
    with torch.no_grad(), _ColumnsRun(model) as run:
        metaquery_rung_states(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad, prefix=head)
        metaquery_rung_states(model.mllm, batch, positions, [0, 1], model.prompts.ids.image_pad, prefix=head)
    full = batch["input_ids"].shape[1]
    assert run.columns == [full, full - head.length]  # deeper rungs: whole row; as deep: prefix used
    half = RowPrefix(head.ids, head.embeds.half(), head.position_ids, head.layers)
    assert shared_prefix_length(half, batch["input_ids"], batch["attention_mask"],
                                model.mllm.get_input_embeddings()(batch["input_ids"]),
                                torch.arange(full).expand(3, 1, -1), 1) == 0


def test_training_runs_rows_whole_with_gradients(pipe):
    model = pipe.model
    rungs = [0, 1, 2]
    _, head = _guidance_head(model, [("", [])], 0, rungs)
    batch, positions = _batch(model, [(PROMPT, [])])
    with _ColumnsRun(model) as run:
        metaquery_rung_states(model.mllm, batch, positions, rungs, model.prompts.ids.image_pad,
                              grad_enabled=True, prefix=head)
    assert run.columns == [batch["input_ids"].shape[1]]  # the prefix is ignored: it holds no graph


def test_encodes_skip_the_shared_columns_and_never_depend_on_history(checkpoint_dir):
    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    model = pipe.model
    system_turn = model.prompts.head_length([], model.config.system_prompt)
    with _ColumnsRun(model) as run:
        first = pipe.encode_prompt(PROMPT)
    negative_columns, prompt_columns = run.columns
    assert negative_columns - system_turn < prompt_columns < negative_columns + len(PROMPT)
    with _ColumnsRun(model) as run:
        pipe.encode_prompt("something else entirely, a much longer prompt than the first one")
        again = pipe.encode_prompt(PROMPT)  # the guidance row and its head from the cache
    assert len(run.columns) == 2  # only the two prompt rows ran
    fresh = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    for conditioning in (again, fresh.encode_prompt(PROMPT)):
        for branch in ("positive", "negative"):
            assert torch.equal(getattr(conditioning.sources[0], branch), getattr(first.sources[0], branch))


def test_an_edit_prompt_row_skips_its_input_images(checkpoint_dir):
    pipe = TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="float32", cache_size=0)
    model = pipe.model
    with _ColumnsRun(model) as run:
        pipe.encode_prompt("make it blue", images=[_image()])
    guidance_columns, prompt_columns = run.columns  # one batch for the two guidance rows, then the prompt row
    assert prompt_columns < guidance_columns - 64


def test_the_head_is_what_does_not_depend_on_the_text(pipe):
    builder = pipe.model.prompts
    system = pipe.model.config.system_prompt
    for images in ([], [12], [12, 30]):
        head = builder.head_length(images, system)
        one, two = (builder.chat_ids(text, images, system) for text in ("a cat", "zebra on a hill"))
        assert one[:head] == two[:head]
        if images:  # "user\n" and the image blocks end the head; the text follows
            assert one[head - 1] == builder.ids.vision_end
    assert builder.head_length([12], system) == builder.head_length([], system) + len(
        builder.text_ids("user\n")) + 14


def test_columns_after_prefix():
    # row 0: no padding; row 1: two pads on the left; prefix of 3 columns
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    columns = columns_after_prefix(mask, 3)
    assert columns.tolist() == [[3, 4, 5], [0, 1, 5]]
    assert mask.gather(1, columns).tolist() == [[1, 1, 1], [0, 0, 1]]


def test_shared_prefix_length_compares_ids_positions_and_embeddings():
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 5, 6, 7, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]).expand(3, -1, -1)
    embeds = ids[..., None].float().expand(-1, -1, 4).clone()
    layer = torch.zeros(1, 2, 4, 8)
    prefix = RowPrefix(torch.tensor([5, 6, 7, 8]), torch.tensor([5., 6., 7., 8.])[:, None].expand(-1, 4),
                       torch.arange(4).expand(3, -1), [(layer, layer)])
    assert shared_prefix_length(prefix, ids, mask, embeds, positions, 1) == 3  # row 1 differs at its 4th column
    assert shared_prefix_length(prefix, ids, mask, embeds, positions, 2) == 0  # only one layer kept
    other_image = embeds.clone()
    other_image[1, 2] += 1  # same id, other features (another image)
    assert shared_prefix_length(prefix, ids, mask, other_image, positions, 1) == 1
    shifted = positions.clone()
    shifted[:, 0, 1] = 7
    assert shared_prefix_length(prefix, ids, mask, embeds, shifted, 1) == 1
    right_padded = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert shared_prefix_length(prefix, ids, right_padded, embeds, positions, 1) == 0
    assert shared_prefix_length(prefix, ids[:1, :2], mask[:1, :2], embeds[:1, :2], positions[:, :1, :2], 1) == 1


def test_a_kept_head_is_a_compact_copy_in_cpu_memory(pipe):
    model = pipe.model
    _, head = _guidance_head(model, [("", []), ("a much longer negative prompt than the first", [])], 0,
                             list(range(model.identity.num_rungs)))
    for tensor in (head.ids, head.embeds, head.position_ids, *head.layers[0]):
        assert tensor.device.type == "cpu"
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()  # not the pass's buffers
