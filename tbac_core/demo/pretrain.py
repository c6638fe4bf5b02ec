"""Pretraining the demo's tiny Qwen2.5-VL on its synthetic world, before TBAC freezes it.

The model is a plain ``transformers`` ``Qwen2_5_VLForConditionalGeneration`` (tied LM head over
the tokenizer's vocabulary, no TBAC rows yet), trained end to end -- vision tower, merger and text
decoder -- with transformers' own causal-LM loss (``labels``: the answer tokens and the closing
``<|im_end|>``; everything else -100) on ``questions.random_conversation`` batches. Conversations
are rendered as TBAC renders them (``PromptBuilder.chat_ids``: system, images first, then text,
``assistant\\n``), so what the model learns is what inference and the ladder later read.
"""
from __future__ import annotations

import inspect
import math
import random

import torch

from ..errors import InvalidParameterError
from ..modeling.mllm import canonical_key
from ..processing.prompting import PromptBuilder
from .questions import Conversation, random_conversation
from .scenes import Scene

IGNORE = -100  # transformers' ignore_index


def standalone_mllm(config: dict, state: dict[str, torch.Tensor]):
    """A trainable Qwen2.5-VL (float32, CPU) from a demo config.json and canonical-key weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    qwen_config = Qwen2_5_VLConfig.from_dict(dict(config))
    qwen_config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(qwen_config)
    own = {canonical_key(k): k for k in model.state_dict()}
    missing = [k for k in own if k not in state and not k.startswith("lm_head.")]
    if missing:
        raise RuntimeError(f"Demo MLLM weights lack {missing[:3]}; this is a bug in the demo build.")
    model.load_state_dict({own[k]: v for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model


def mllm_state(model) -> dict[str, torch.Tensor]:
    """The model's weights in the canonical layout, without the (tied) LM head."""
    return {canonical_key(k): v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("lm_head.")}


def conversation_batch(builder: PromptBuilder, conversations: list[Conversation]) -> dict:
    """Model inputs [B, S] (left-padded) with ``labels`` on each answer and its ``<|im_end|>``."""
    images = [img for conv in conversations for img in conv.images]
    pixel_values = grid_thw = None
    counts: list[int] = []
    if images:
        pixel_values, grid_thw = builder.process_images([builder.prepare_image(img) for img in images])
        counts = builder.tokens_per_image(grid_thw)
    rows, answer_lengths, cursor = [], [], 0
    for conv in conversations:
        answer = [*builder.text_ids(conv.answer), builder.ids.im_end]
        rows.append(builder.chat_ids(conv.text, counts[cursor: cursor + len(conv.images)], conv.system, answer))
        cursor += len(conv.images)
        answer_lengths.append(len(answer))
    input_ids, attention_mask = builder.pad_left(rows)
    labels = torch.full_like(input_ids, IGNORE)
    for row, length in enumerate(answer_lengths):
        labels[row, -length:] = input_ids[row, -length:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=grid_thw,
                     mm_token_type_ids=(input_ids == builder.ids.image_pad).to(torch.int))
    return batch


def warmup_cosine_schedule(optimizer, steps: int, min_lr_rate: float):
    """Linear warm-up over the first 5 % of ``steps``, then cosine down to ``min_lr_rate`` of the peak
    (transformers' schedule, the one the ladder ``Trainer`` uses too)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, max(1, steps // 20), steps, min_lr_rate=min_lr_rate)


def pretrain_mllm(model, builder: PromptBuilder, scenes: list[Scene], *, steps: int, batch_size: int,
                  learning_rate: float, image_size: int, seed: int, log=print) -> list[float]:
    """Train ``model`` in place on random conversations about ``scenes``; return the losses."""
    if steps < 1 or batch_size < 1:
        raise InvalidParameterError(f"MLLM pretraining steps and batch size must be >= 1, got {steps} and {batch_size}.")
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = warmup_cosine_schedule(optimizer, steps, min_lr_rate=0.05)
    rng = random.Random(seed)
    losses: list[float] = []
    # transformers 5 places image tokens' M-RoPE positions from mm_token_type_ids; 4.5x has no such input.
    takes_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    for step in range(steps):
        batch = conversation_batch(builder, [random_conversation(scenes, image_size, rng) for _ in range(batch_size)])
        if not takes_token_types:
            batch.pop("mm_token_type_ids", None)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"MLLM pretraining diverged at step {step + 1} (loss {losses[-1]}); lower the rate.")
        if step % 200 == 0 or step == steps - 1:
            recent = losses[-50:]
            log(f"  mllm step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}")
    model.eval().requires_grad_(False)
    return losses
