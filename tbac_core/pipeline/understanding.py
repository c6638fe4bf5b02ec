"""Image understanding: answers and captions from TBAC-UniImage's frozen Qwen2.5-VL.

TBAC-UniImage never trains its MLLM, so the loaded checkpoint still answers questions about images
as Qwen2.5-VL-Instruct does. This module reuses the already loaded ``model.mllm`` (nothing is
loaded twice) and decodes with transformers' ``generate``. The entry points take a ``TBACPipeline``,
whose placement brings the MLLM to its compute device (``placement.use("mllm")``).

* LM head: the core rebuilds it from the tied input embedding over the base vocabulary only
  (``tbac_core.modeling.mllm.attach_lm_head``), so the metaquery and padding rows TBAC appended to the
  embedding have no logit and can never be generated. ``answer`` checks this before decoding.
* Prompt: Qwen2.5-VL's own chat format with its default system prompt ("You are a helpful
  assistant.") unless the caller gives one, never TBAC's generation system prompt; images first,
  then the question. The question is tokenised as plain text, so typed special tokens
  (``<|im_end|>``, ``<|image_pad|>``...) cannot break the conversation structure.
* Images: Qwen2.5-VL's native dynamic resolution (the processor's saved ``min_pixels`` /
  ``max_pixels``), not TBAC's fixed 256 * 28 * 28 generation budget: understanding is the task
  Qwen was trained for at native resolution, small text and details survive, and the answers
  equal those of the stock model with its stock processor. The published processor allows
  12.8 MP (16384 visual tokens) per image, which a huge input would really use, so ``max_pixels``
  is capped at ``MAX_IMAGE_PIXELS`` (1280 * 28 * 28, Qwen's recommended upper setting and the
  transformers default) per image, and several images share ``MAX_TOTAL_IMAGE_PIXELS``.
* Decoding: greedy or sampling (temperature, top-p, top-k, repetition penalty) up to
  ``max_new_tokens``, stopping at ``<|im_end|>`` or ``<|endoftext|>``. Sampling is seeded inside
  ``torch.random.fork_rng``, so the caller's global RNG state is left as it was.
"""
from __future__ import annotations

import inspect
import unicodedata
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import InvalidParameterError
from ..modeling.mllm import vision_dtype
from ..modeling.model import TBACModel
from ..params import GenerationSettings, check_text, check_vision_budget
from ..processing.images import image_list
from ..processing.prompting import QWEN_DEFAULT_SYSTEM_PROMPT, PromptBuilder
from .tbac_pipeline import TBACPipeline

PRESETS: dict[str, str | None] = {
    "describe in detail": "Describe this image in detail.",
    "short caption": "Write a short caption for this image, in one sentence.",
    "write a generation prompt for this image": (
        "Write a prompt for a text-to-image model that would recreate this image. Describe the main "
        "subject, the setting, the composition, the style, the colors and the lighting in one paragraph. "
        "Reply with the prompt only."
    ),
    "custom": None,  # the question is used as is
}

# Per-image visual budget (pixels; 28 * 28 pixels make one visual token after the 2x2 merge).
MIN_IMAGE_PIXELS = 56 * 56  # Qwen2-VL's default, used when no preprocessor config says otherwise
MAX_IMAGE_PIXELS = 1280 * 28 * 28  # 1,003,520 px = 1280 visual tokens
MAX_TOTAL_IMAGE_PIXELS = 4 * MAX_IMAGE_PIXELS  # all images of one question together


def resolve_question(preset: str, question: str = "") -> str:
    """The question for a preset; with a preset other than ``custom`` the question adds to it."""
    if preset not in PRESETS:
        raise InvalidParameterError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    if not isinstance(question, str):
        raise InvalidParameterError(f"The question must be a string, got {type(question).__name__}.")
    base = PRESETS[preset]
    if base is None:
        if not question.strip():
            raise InvalidParameterError("The preset is 'custom' but the question is empty: type a question.")
        return question
    return base + ("\n" + question.strip() if question.strip() else "")


# -- images --------------------------------------------------------------------------------------
def pixel_budget(model: TBACModel, num_images: int, max_pixels: int | None = None) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` per image for a question showing ``num_images`` images.

    From the saved processor settings, ``max_pixels`` capped at ``MAX_IMAGE_PIXELS`` (or the given
    ``max_pixels``) and at an equal share of ``MAX_TOTAL_IMAGE_PIXELS``.
    """
    settings = model.prompts.processor_settings
    size = settings.get("size") or {}
    saved_min = settings.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or MIN_IMAGE_PIXELS
    saved_max = settings.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or MAX_IMAGE_PIXELS
    low = int(saved_min)
    if max_pixels is None:
        high = min(int(saved_max), MAX_IMAGE_PIXELS)
    else:
        is_int = isinstance(max_pixels, int) and not isinstance(max_pixels, bool)
        if not is_int or not low <= max_pixels <= MAX_TOTAL_IMAGE_PIXELS:
            raise InvalidParameterError(
                f"max_pixels must be an integer in {low}..{MAX_TOTAL_IMAGE_PIXELS} (28*28 pixels = one visual "
                f"token), got {max_pixels!r}."
            )
        high = max_pixels
    if num_images > 1:
        high = min(high, MAX_TOTAL_IMAGE_PIXELS // num_images)
    check_vision_budget(num_images, max(low, high))  # a saved min_pixels may be huge
    return low, max(low, high)


def understanding_prompts(model: TBACModel, min_pixels: int, max_pixels: int) -> PromptBuilder:
    """A PromptBuilder sharing the model's tokenizer, with a dynamic-resolution image processor.

    Same processor class (the PIL path) and normalisation as TBAC's, only the pixel range differs.
    """
    base = model.prompts
    kwargs = {k: v for k, v in base.processor_settings.items()
              if k not in ("min_pixels", "max_pixels", "size", "image_processor_type", "processor_class")}
    if not kwargs:  # no preprocessor_config.json was found: the built-in settings of the TBAC processor
        kwargs = {k: getattr(base.image_processor, k) for k in (
            "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
            "merge_size", "patch_size", "resample", "rescale_factor", "temporal_patch_size",
        ) if hasattr(base.image_processor, k)}
    processor = type(base.image_processor)(
        **kwargs,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return PromptBuilder(base.tokenizer, processor, None, base.processor_settings)


# -- decoding ------------------------------------------------------------------------------------
class _ProgressAndCancel(StoppingCriteria):
    """Called by ``generate`` after every new token: reports progress, lets the caller cancel.

    It never stops generation itself; an exception raised by ``check_cancel`` propagates.
    """

    def __init__(self, prompt_length: int, max_new_tokens: int, callback=None, check_cancel=None):
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.callback = callback
        self.check_cancel = check_cancel

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.check_cancel is not None:
            self.check_cancel()
        if self.callback is not None:
            self.callback(input_ids.shape[1] - self.prompt_length, self.max_new_tokens)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed the RNG that sampling draws from, restoring the caller's RNG state afterwards."""
    accelerator = device.type not in ("cpu", "meta")
    forked = [device.index if device.index is not None else 0] if accelerator else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if accelerator else "cuda"):
        torch.default_generator.manual_seed(seed)
        if accelerator:
            module = getattr(torch, device.type)
            with module.device(device) if hasattr(module, "device") else nullcontext():
                module.manual_seed(seed)
        yield


def _generation_config(settings: GenerationSettings, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    values = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        repetition_penalty=float(settings.repetition_penalty),
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        num_beams=1,
    )
    if settings.do_sample:
        values.update(temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=settings.top_k)
    else:
        # transformers' global defaults: nothing is taken from the model's own generation_config,
        # and transformers does not warn about sampling flags set for greedy decoding.
        values.update(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**values)


def check_lm_head(model: TBACModel) -> None:
    """Refuse to decode if the LM head covers more than the base vocabulary (see module doc)."""
    head = model.mllm.get_output_embeddings()
    rows = getattr(head, "out_features", None) or head.weight.shape[0]
    if rows != model.base_vocab:
        raise RuntimeError(
            f"The MLLM's LM head has {rows} output rows but the base vocabulary has {model.base_vocab}: it "
            f"could generate TBAC's metaquery rows. Load the model with tbac_core.load_model."
        )


def _check_pipeline(pipe) -> None:
    if not isinstance(pipe, TBACPipeline):
        raise InvalidParameterError(
            f"Understanding runs on a TBACPipeline (it places the MLLM), got {type(pipe).__name__}; wrap a "
            f"loaded model as TBACPipeline(model)."
        )


def _rope_state_owners(mllm) -> list:
    # transformers <= 4.51 keeps ``rope_deltas`` on the outer model, >= 4.52 on ``model.model``.
    return [m for m in (mllm, getattr(mllm, "model", None)) if m is not None and hasattr(m, "rope_deltas")]


def _check_request(question, system_prompt, settings) -> None:
    if not isinstance(settings, GenerationSettings):
        raise InvalidParameterError(f"settings must be a GenerationSettings, got {type(settings).__name__}.")
    settings.validate()
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidParameterError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}.")
    if not isinstance(question, str):
        raise InvalidParameterError(f"Questions must be strings, got {type(question).__name__}.")
    if system_prompt is not None:
        check_text(system_prompt, "system_prompt")
    check_text(question, "question")
    if not question.strip():
        raise InvalidParameterError(
            "The question is empty: type a question, or pick a preset ("
            + ", ".join(p for p, text in PRESETS.items() if text is not None) + ")."
        )


@torch.no_grad()
def generate_answer_ids(
    pipe: TBACPipeline,
    question: str,
    images=None,
    *,
    system_prompt: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    callback: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    max_pixels: int | None = None,
) -> tuple[dict, list[int]]:
    """Run ``generate`` for one question -> (model inputs [1, S], the new token ids).

    The ids are exactly what ``generate`` produced after the prompt, the stop token included when
    one was produced. Arguments as for ``answer``.
    """
    _check_pipeline(pipe)
    _check_request(question, system_prompt, settings)
    model = pipe.model
    check_lm_head(model)

    pil = [model.prompts.prepare_image(img) for img in image_list(images)]
    builder = understanding_prompts(model, *pixel_budget(model, len(pil), max_pixels))
    # An empty or whitespace-only system prompt falls back to Qwen's default, as None does.
    system = system_prompt if system_prompt and system_prompt.strip() else QWEN_DEFAULT_SYSTEM_PROMPT
    inputs = builder.build_batch([(question, pil)], system)

    ids = builder.ids
    config = _generation_config(settings, stop_ids=[ids.im_end, ids.pad], pad_id=ids.pad)
    if check_cancel is not None:
        check_cancel()

    with model.mllm_lock, pipe.placement.use("mllm") as mllm:
        device = mllm.device  # the first parameter's: resident under partial loading (see layer_offload)
        kwargs = {
            "input_ids": inputs["input_ids"].to(device),  # [1, S]
            "attention_mask": inputs["attention_mask"].to(device),
        }
        if inputs["pixel_values"] is not None:
            kwargs["pixel_values"] = inputs["pixel_values"].to(device=device, dtype=vision_dtype(mllm))
            kwargs["image_grid_thw"] = inputs["image_grid_thw"].to(device)  # [num_images, 3]
            if "mm_token_type_ids" in inspect.signature(mllm.forward).parameters:
                # transformers 5 builds the 3-D M-RoPE positions of image tokens from this (1 = image).
                kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == ids.image_pad).to(torch.int)
        prompt_length = kwargs["input_ids"].shape[1]
        progress = _ProgressAndCancel(prompt_length, settings.max_new_tokens, callback, check_cancel)
        if "use_model_defaults" in inspect.signature(mllm.generate).parameters:
            kwargs["use_model_defaults"] = False  # transformers 4.5x: only our generation config counts
        try:
            with _seeded(settings.seed, device):
                output = mllm.generate(
                    **kwargs,
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([progress]),
                )
        finally:
            # Leave no per-call M-RoPE state on the shared model.
            for owner in _rope_state_owners(mllm):
                owner.rope_deltas = None
    sequences = output if isinstance(output, torch.Tensor) else output.sequences  # [1, S + new]
    return inputs, sequences[0, prompt_length:].tolist()


def decode_answer(model: TBACModel, new_ids: list[int]) -> str:
    """Text of the generated ids up to the first stop token, special tokens dropped."""
    ids = model.prompts.ids
    for index, token in enumerate(new_ids):
        if token in (ids.im_end, ids.pad):
            new_ids = new_ids[:index]
            break
    text = model.prompts.tokenizer.decode(new_ids, skip_special_tokens=True)
    return strip_control_characters(text).strip()


def strip_control_characters(text: str) -> str:
    """``text`` without control characters (Unicode category Cc) other than newline and tab.

    A byte-level tokenizer can emit any byte; a weak or confused model's stray BEL, ESC or NUL would
    otherwise reach terminals, PNG text chunks and JSON output.
    """
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def answer_batch(
    pipe: TBACPipeline,
    questions: list[str],
    images: list | None = None,
    *,
    system_prompt: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    callback: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    max_pixels: int | None = None,
) -> list[str]:
    """Answer independent questions; ``images``: None or one image list (possibly empty) per question.

    The questions run one after the other, each with the same seed, so an answer never depends on
    the questions beside it. (One padded ``generate`` batch would be faster on a GPU, but
    transformers 4.52-4.57 give left-padded Qwen2.5-VL rows wrong M-RoPE positions while
    decoding.) ``callback(done, total)`` counts over all questions: total = questions x
    ``max_new_tokens``. Every question is checked before the first one runs.
    """
    _check_pipeline(pipe)
    questions = list(questions)
    if not questions:
        raise InvalidParameterError("No question given: pass at least one question.")
    per_question = [[] for _ in questions] if images is None else list(images)
    if len(per_question) != len(questions):
        raise InvalidParameterError(
            f"Got image lists for {len(per_question)} questions but {len(questions)} questions; give one "
            f"list (possibly empty) per question."
        )
    for question in questions:
        _check_request(question, system_prompt, settings)
    answers = []
    total = len(questions) * settings.max_new_tokens
    for index, (question, imgs) in enumerate(zip(questions, per_question)):
        offset = index * settings.max_new_tokens
        row_callback = None if callback is None else (lambda done, _, offset=offset: callback(offset + done, total))
        _, new_ids = generate_answer_ids(
            pipe, question, imgs, system_prompt=system_prompt, settings=settings,
            callback=row_callback, check_cancel=check_cancel, max_pixels=max_pixels,
        )
        answers.append(decode_answer(pipe.model, new_ids))
    return answers


def answer(
    pipe: TBACPipeline,
    question: str,
    images=None,
    *,
    system_prompt: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    callback: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    max_pixels: int | None = None,
) -> str:
    """Answer ``question`` about ``images``: None, one image, a list of images (PIL, numpy or torch
    [H, W, C]) or a ComfyUI IMAGE batch [B, H, W, C] (several images, one question).

    ``pipe``: a ``TBACPipeline`` (its placement brings the MLLM to the device).
    ``system_prompt``: None or empty = Qwen2.5-VL's default.
    ``callback(done_tokens, max_new_tokens)`` runs after every generated token; ``check_cancel()``
    runs before the prompt is read and after every token, and what it raises propagates.
    ``max_pixels``: per-image pixel budget (default: the processor's, capped at MAX_IMAGE_PIXELS).
    The answer is the text up to ``<|im_end|>``, special tokens and control characters (but newline
    and tab) dropped, stripped.
    """
    _, new_ids = generate_answer_ids(
        pipe, question, images, system_prompt=system_prompt, settings=settings,
        callback=callback, check_cancel=check_cancel, max_pixels=max_pixels,
    )
    return decode_answer(pipe.model, new_ids)
