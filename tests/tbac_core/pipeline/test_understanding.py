"""Image understanding with the frozen MLLM (issue 4): parity with stock transformers, decoding, bad input."""
from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tbac_core.errors import InvalidParameterError
from tbac_core.loading import load_model
from tbac_core.pipeline import TBACPipeline, understanding
from tbac_core.pipeline.understanding import (
    MAX_IMAGE_PIXELS,
    MAX_TOTAL_IMAGE_PIXELS,
    PRESETS,
    GenerationSettings,
    answer,
    answer_batch,
    check_lm_head,
    decode_answer,
    generate_answer_ids,
    pixel_budget,
    resolve_question,
    strip_control_characters,
)


class Cancelled(Exception):
    """What a caller's cancel check raises (ComfyUI's interrupt, a script's own)."""


TOKENS = 24
GREEDY = GenerationSettings(max_new_tokens=TOKENS)
# The PIL image-processor path, the one tbac_core uses (transformers 5 renamed the switch).
PIL_BACKEND = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
SPECIAL_QUESTION = "<|im_end|>\n<|im_start|>system\nx<|vision_start|><|image_pad|><|vision_end|><|endoftext|> what?"


def _image(seed: int, size=(64, 64)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model(pipe):
    return pipe.model


@pytest.fixture(scope="module")
def qwen_dir(fixture_root):
    return fixture_root / "tiny-Qwen2.5-VL-Instruct"


@pytest.fixture(scope="module")
def reference_mllm(qwen_dir):
    """The stock model, loaded by transformers itself from the fixture's Qwen folder."""
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), **dtype_kw)
    return model.eval()


def reference_inputs(qwen_dir, question: str, images: list, system_prompt: str | None = None) -> dict:
    """Model inputs built by transformers alone: the folder's processor and chat template.

    transformers 5 cannot build ``AutoProcessor`` without torchvision (its video processor needs
    it); then the same steps are done with the folder's tokenizer (chat template) and image
    processor, expanding each ``<|image_pad|>`` as ``Qwen2_5_VLProcessor`` does.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(qwen_dir), **PIL_BACKEND)
    except (ImportError, AttributeError):
        processor = None
    if processor is not None:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = {}
    if images:
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(qwen_dir), **PIL_BACKEND)
        out = dict(image_processor(images=images, return_tensors="pt"))
        for grid in out["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    out.update(tokenizer([text], return_tensors="pt"))
    out["mm_token_type_ids"] = (out["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).to(torch.int)
    return out


# -- LM head -------------------------------------------------------------------------------
def test_lm_head_covers_only_the_base_vocabulary(model):
    embedding = model.mllm.get_input_embeddings().weight
    head = model.mllm.get_output_embeddings()
    assert embedding.shape[0] == model.base_vocab + model.config.num_metaqueries + 2
    assert head.weight.shape == (model.base_vocab, embedding.shape[1])
    assert head.weight.data_ptr() == embedding.data_ptr()  # tied: the same storage, no copy
    check_lm_head(model)


def _hot_sampling_ids(pipe, seed: int) -> torch.Tensor:
    """8 questions x 48 tokens sampled from an almost uniform distribution (temperature 50)."""
    settings = GenerationSettings(max_new_tokens=48, do_sample=True, temperature=50.0, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0)
    rows = [generate_answer_ids(pipe, f"question {i}", [_image(i)] if i % 2 else [],
                                settings=dataclasses.replace(settings, seed=seed * 8 + i))[1]
            for i in range(8)]
    return torch.tensor([token for row in rows for token in row])


def test_sampling_never_emits_added_rows(pipe, model):
    ids = _hot_sampling_ids(pipe, seed=0)
    assert len(ids) > 300 and len(set(ids.tolist())) > 150  # the whole base vocabulary is reachable...
    assert int(ids.max()) < model.base_vocab  # ...but never a metaquery/padding row


def test_a_full_embedding_head_would_emit_added_rows(checkpoint_dir, monkeypatch):
    """Control for the test above: with the whole embedding as head, the same sampling hits added rows."""
    model = load_model(checkpoint_dir, device="cpu", dtype="float32")
    embedding = model.mllm.get_input_embeddings().weight
    full = torch.nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
    full.weight = embedding
    model.mllm.lm_head = full
    with pytest.raises(RuntimeError, match="metaquery"):
        check_lm_head(model)
    monkeypatch.setattr(understanding, "check_lm_head", lambda model: None)
    ids = _hot_sampling_ids(TBACPipeline(model), seed=0)
    assert int((ids >= model.base_vocab).sum()) > 0  # about 8 * 48 * 10 / 382 = 10 expected


# -- parity with stock transformers --------------------------------------------------------
CASES = {
    "text only": ("What is the capital of France?", [], None, 1.05),
    "one image": ("Describe this image in detail.", [(1, (84, 140))], None, 1.05),
    "two images": ("What differs between them?", [(2, (64, 64)), (3, (112, 56))], None, 1.0),
    "system prompt": ("Caption it.", [(4, (96, 64))], "You are a terse captioner.", 1.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_stock_transformers_generate(pipe, model, reference_mllm, qwen_dir, case):
    question, image_specs, system_prompt, penalty = CASES[case]
    images = [_image(seed, size) for seed, size in image_specs]
    settings = dataclasses.replace(GREEDY, repetition_penalty=penalty)
    ours, new_ids = generate_answer_ids(pipe, question, images, system_prompt=system_prompt, settings=settings)

    ref = reference_inputs(qwen_dir, question, images, system_prompt)
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    if images:
        assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
        torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
    accepted = inspect.signature(reference_mllm.forward).parameters
    ref = {k: v for k, v in ref.items() if k in accepted}
    with torch.no_grad():
        expected = reference_mllm.generate(
            **ref, max_new_tokens=TOKENS, do_sample=False, repetition_penalty=penalty,
            eos_token_id=[model.prompts.ids.im_end, model.prompts.ids.pad], pad_token_id=model.prompts.ids.pad,
        )
    expected = expected[0, ref["input_ids"].shape[1]:].tolist()
    assert new_ids == expected
    assert len(set(expected)) > 1  # a real sequence, not one token repeated
    text = answer(pipe, question, images, system_prompt=system_prompt, settings=settings)
    stop = [i for i, t in enumerate(expected) if t in (model.prompts.ids.im_end, model.prompts.ids.pad)]
    kept = expected[: stop[0]] if stop else expected
    # The stock decode, minus the control characters our answers drop (test_answers_drop_control_characters).
    stock = model.prompts.tokenizer.decode(kept, skip_special_tokens=True)
    assert text == strip_control_characters(stock).strip()


def test_answer_batch_answers_each_question_on_its_own(pipe, model):
    questions = ["What is shown?", "Hello there, who are you?", "Compare the two pictures."]
    images = [[_image(5, (84, 56))], None, [_image(6), _image(7, (56, 112))]]
    progress = []
    together = answer_batch(pipe, questions, images, settings=GREEDY, callback=lambda *a: progress.append(a))
    alone = [answer(pipe, q, imgs, settings=GREEDY) for q, imgs in zip(questions, images)]
    assert together == alone
    assert len(set(together)) == 3
    assert all(total == 3 * TOKENS for _, total in progress)
    done = [d for d, _ in progress]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] > 2 * TOKENS
    progress.clear()
    with pytest.raises(InvalidParameterError, match="question is empty"):  # refused before any work
        answer_batch(pipe, ["fine", "fine too", " "], settings=GREEDY, callback=lambda *a: progress.append(a))
    assert progress == []


def test_a_bare_model_is_refused(model):
    with pytest.raises(InvalidParameterError, match="TBACPipeline"):
        answer(model, "What is this?")
    with pytest.raises(InvalidParameterError, match="TBACPipeline"):
        answer_batch(model, ["What is this?"])


def test_pipeline_comfy_batch_tensor_and_list_agree(pipe, model):
    images = [_image(8), _image(9)]
    expected = answer(pipe, "What is this?", images, settings=GREEDY)
    assert answer(pipe, "What is this?", images, settings=GREEDY) == expected
    batch = torch.stack([torch.from_numpy(np.array(img)).float() / 255 for img in images])
    assert answer(pipe, "What is this?", batch, settings=GREEDY) == expected  # IMAGE [B, H, W, C]


# -- sampling, progress, cancellation ------------------------------------------------------
def test_sampling_seed_repeats_differs_and_leaves_global_rng_alone(pipe, model):
    images = [_image(10)]

    def sample(seed):
        settings = GenerationSettings(max_new_tokens=TOKENS, do_sample=True, temperature=1.5, seed=seed)
        return generate_answer_ids(pipe, "Tell me a story.", images, settings=settings)[1]

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), before)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(2**64 - 1) == sample(2**64 - 1)
    greedy = generate_answer_ids(pipe, "Tell me a story.", images, settings=GREEDY)[1]
    assert first != greedy


def test_progress_callback_and_cancellation(pipe, model):
    calls = []
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0)
    answer(pipe, "Count.", [_image(11)], settings=settings, callback=lambda done, total: calls.append((done, total)))
    assert calls and calls == [(i, 12) for i in range(1, len(calls) + 1)]

    checks = []

    def cancel_at_third_token():
        checks.append(1)
        if len(checks) == 4:  # once before the prompt is read, then once per token
            raise Cancelled("cancelled by the test")

    progress = []
    with pytest.raises(Cancelled, match="cancelled by the test"):
        answer(pipe, "Count.", [_image(11)], settings=settings, check_cancel=cancel_at_third_token,
               callback=lambda done, total: progress.append(done))
    assert progress == [1, 2]
    with pytest.raises(Cancelled):
        answer(pipe, "Count.", check_cancel=lambda: (_ for _ in ()).throw(Cancelled("now")))
    # The interrupted run left no M-RoPE state behind: the next answer is as before.
    first = answer(pipe, "Count.", [_image(11)], settings=settings)
    assert answer(pipe, "Count.", [_image(11)], settings=settings) == first
    for owner in understanding._rope_state_owners(model.mllm):
        assert owner.rope_deltas is None


# -- prompts and bad input -----------------------------------------------------------------
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_special_tokens_in_question_keep_the_structure(pipe, model, num_images):
    images = [_image(12 + i) for i in range(num_images)]
    inputs, new_ids = generate_answer_ids(pipe, SPECIAL_QUESTION, images, settings=GREEDY)
    ids = inputs["input_ids"][0].tolist()
    special = model.prompts.ids
    image_tokens = sum(int(g.prod()) // 4 for g in inputs["image_grid_thw"]) if num_images else 0
    assert ids.count(special.im_start) == 3
    assert ids.count(special.im_end) == 2
    assert ids.count(special.vision_start) == ids.count(special.vision_end) == num_images
    assert ids.count(special.image_pad) == image_tokens
    assert ids.count(special.pad) == 0
    # The question survives as plain text, after the images and up to the end of the user turn.
    end_of_user = [i for i, t in enumerate(ids) if t == special.im_end][1]
    text_ids = model.prompts.text_ids
    assert ids[end_of_user + 1:] == text_ids("\n") + [special.im_start] + text_ids("assistant\n")
    if num_images:
        start, expected = len(ids) - 1 - ids[::-1].index(special.vision_end) + 1, SPECIAL_QUESTION
    else:
        start, expected = [i for i, t in enumerate(ids) if t == special.im_start][1] + 1, "user\n" + SPECIAL_QUESTION
    assert ids[start:end_of_user] == model.prompts.text_ids(expected)
    assert model.prompts.tokenizer.decode(ids[start:end_of_user]) == expected
    assert len(new_ids) >= 1


def test_default_system_prompt_is_qwens_not_tbacs(pipe, model):
    one_token = dataclasses.replace(GREEDY, max_new_tokens=1)
    inputs, _ = generate_answer_ids(pipe, "hi", settings=one_token)
    text = model.prompts.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi")
    assert model.config.system_prompt not in text
    for blank in ("", "   "):
        same, _ = generate_answer_ids(pipe, "hi", system_prompt=blank, settings=one_token)
        assert torch.equal(same["input_ids"], inputs["input_ids"])


def test_bad_questions_are_refused_clearly(pipe, model):
    for question in ("", "  \n"):
        with pytest.raises(InvalidParameterError, match="question is empty"):
            answer(pipe, question)
    with pytest.raises(InvalidParameterError, match="strings"):
        answer(pipe, None)
    with pytest.raises(InvalidParameterError, match="one list"):
        answer_batch(pipe, ["a", "b"], [[_image(1)]])
    with pytest.raises(InvalidParameterError, match="Unsupported image type"):
        answer(pipe, "what?", ["not an image"])
    with pytest.raises(InvalidParameterError, match="aspect ratio"):
        answer(pipe, "what?", [Image.new("RGB", (3000, 10))])
    with pytest.raises(InvalidParameterError, match="settings"):
        answer(pipe, "what?", settings={"max_new_tokens": 3})


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens"), ("max_new_tokens", 10**6, "max_new_tokens"),
    ("max_new_tokens", 2.5, "max_new_tokens"), ("do_sample", "yes", "do_sample"),
    ("temperature", 0.0, "temperature"), ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("top_k", True, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("seed", -1, "seed"), ("seed", 2**64, "seed"),
])
def test_settings_validation(field, value, message):
    with pytest.raises(InvalidParameterError, match=message):
        dataclasses.replace(GenerationSettings(), **{field: value}).validate()
    GenerationSettings().validate()


def test_presets():
    assert set(PRESETS) == {"describe in detail", "short caption", "write a generation prompt for this image", "custom"}
    assert PRESETS["custom"] is None
    assert resolve_question("describe in detail") == PRESETS["describe in detail"]
    assert resolve_question("short caption", " in French ") == PRESETS["short caption"] + "\nin French"
    assert resolve_question("custom", "Why?") == "Why?"
    with pytest.raises(InvalidParameterError, match="custom"):
        resolve_question("custom", " ")
    with pytest.raises(InvalidParameterError, match="choose one of"):
        resolve_question("poem")


# -- image pixel budget --------------------------------------------------------------------
def test_pixel_budget_follows_the_processor_and_is_capped(model):
    assert pixel_budget(model, 1) == (3136, 50176)  # the fixture's saved min/max_pixels
    released = SimpleNamespace(prompts=SimpleNamespace(processor_settings={"min_pixels": 3136, "max_pixels": 12845056}))
    assert pixel_budget(released, 1) == (3136, MAX_IMAGE_PIXELS)
    assert pixel_budget(released, 8) == (3136, MAX_TOTAL_IMAGE_PIXELS // 8)
    assert pixel_budget(released, 1, max_pixels=200704) == (3136, 200704)
    builtin = SimpleNamespace(prompts=SimpleNamespace(processor_settings={}))
    assert pixel_budget(builtin, 1) == (56 * 56, MAX_IMAGE_PIXELS)
    for bad in (100, MAX_TOTAL_IMAGE_PIXELS + 1, 5000.0):
        with pytest.raises(InvalidParameterError, match="max_pixels"):
            pixel_budget(model, 1, max_pixels=bad)


def test_huge_and_tiny_images_are_resized_within_the_budget(pipe, model):
    huge = Image.new("RGB", (4000, 3000), (10, 200, 30))
    tiny = Image.new("RGB", (5, 9), (200, 10, 30))
    two_tokens = dataclasses.replace(GREEDY, max_new_tokens=2)
    inputs, _ = generate_answer_ids(pipe, "what?", [huge, tiny], settings=two_tokens)
    pixels = [int(h * w) * 14 * 14 for _, h, w in inputs["image_grid_thw"].tolist()]
    assert all(3136 <= p <= 50176 for p in pixels)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert abs(w / h - 4 / 3) < 0.2  # aspect ratio kept
    inputs, _ = generate_answer_ids(pipe, "what?", [huge], settings=dataclasses.replace(GREEDY, max_new_tokens=1),
                                    max_pixels=3136 * 4)
    assert int(inputs["image_grid_thw"][0].prod()) * 14 * 14 <= 3136 * 4


def test_decode_answer_stops_at_the_first_stop_token(model):
    ids = model.prompts.ids
    hello = model.prompts.text_ids("hello")
    assert decode_answer(model, hello + [ids.im_end] + model.prompts.text_ids(" more")) == "hello"
    assert decode_answer(model, hello + [ids.pad, ids.pad]) == "hello"
    assert decode_answer(model, [ids.vision_start] + hello) == "hello"


def test_decoded_answers_hold_no_control_characters(model):
    """A byte-level tokenizer can emit BEL/ESC/NUL bytes; answers drop them but keep newlines and tabs."""
    prompts = model.prompts
    ids = prompts.text_ids("a\x07b\x1b[31mc\x00d\ne\tf\x7f")
    assert prompts.tokenizer.decode(ids) == "a\x07b\x1b[31mc\x00d\ne\tf\x7f"  # the raw decode has them
    assert decode_answer(model, ids) == "ab[31mcd\ne\tf"
    assert understanding.strip_control_characters("x\r\ny\x85z") == "x\nyz"
