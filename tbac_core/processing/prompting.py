"""Turning captions and images into Qwen2.5-VL inputs, exactly as TBAC-UniImage was trained.

The official code renders the Qwen2-VL chat template to a string and tokenises it whole, so
special tokens typed by a user (``<|im_end|>``, ``<|image_pad|>``...) would be parsed as
structure. We render the same template piece by piece instead: structural tokens are inserted as
ids, every user-supplied text is tokenised with ``split_special_tokens=True`` (plain text). For
text without special tokens the ids are identical to the official ones, because Qwen's tokenizer
splits on special tokens before pre-tokenising anyway.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ComponentNotFoundError, InvalidParameterError
from ..params import check_text
from .images import to_pil_rgb

logger = logging.getLogger(__name__)

# Qwen2.5-VL's default when a conversation has no system message (its chat template).
QWEN_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# TBAC-UniImage resizes every input image to exactly this many pixels (256 merged tokens).
TBAC_IMAGE_PIXELS = 256 * 28 * 28
MIN_IMAGE_SIDE = 28

STRUCTURE_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "pad": "<|endoftext|>",
}


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        ids = {}
        for field_name, token in STRUCTURE_TOKENS.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ComponentNotFoundError(
                    f"The tokenizer has no {token} token; it is not a Qwen2.5 tokenizer."
                )
            ids[field_name] = int(token_id)
        return cls(**ids)


def make_image_processor(settings: dict, pixels: int = TBAC_IMAGE_PIXELS):
    """Qwen2-VL image processor on its PIL path, fixed to ``pixels`` pixels per image.

    The PIL path is the one TBAC-UniImage was trained with; the torchvision one differs by up to
    one 8-bit level. transformers 5 names it ``Qwen2VLImageProcessorPil``.
    """
    try:
        from transformers import Qwen2VLImageProcessorPil as processor_class
    except ImportError:
        from transformers import Qwen2VLImageProcessor as processor_class
    kwargs = {k: v for k, v in settings.items()
              if k not in ("min_pixels", "max_pixels", "size", "image_processor_type", "processor_class")}
    return processor_class(
        **kwargs,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        min_pixels=pixels,
        max_pixels=pixels,
    )


class PromptBuilder:
    """Renders TBAC/Qwen2.5-VL conversations to token ids and images to pixel patches."""

    def __init__(self, tokenizer, image_processor, max_text_tokens: int | None = None,
                 processor_settings: dict | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = max_text_tokens
        # The saved preprocessor_config.json (its min/max_pixels are used by image understanding).
        self.processor_settings = dict(processor_settings or {})
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.patch_size = int(getattr(image_processor, "patch_size", 14))

    # -- text ------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Token ids of user text, special-token look-alikes kept as plain text."""
        if not text:
            return []
        check_text(text, "text")  # the backstop: every text reaches the tokenizer through here
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def truncate_caption(self, caption: str) -> str:
        """The official ``decode(encode(caption)[:max_input_text_tokens])`` normalisation."""
        if not isinstance(caption, str):
            raise InvalidParameterError(f"Prompts must be strings, got {type(caption).__name__}.")
        ids = self.text_ids(caption)
        if self.max_text_tokens is not None and len(ids) > self.max_text_tokens:
            logger.warning(
                "Prompt is %d tokens long; only the first %d are used (as in the official model): %.60r...",
                len(ids), self.max_text_tokens, caption,
            )
            ids = ids[: self.max_text_tokens]
        return self.tokenizer.decode(ids)

    def chat_ids(
        self,
        user_text: str,
        num_image_tokens: list[int],
        system_prompt: str | None,
        suffix_ids: list[int] = (),
    ) -> list[int]:
        """Qwen2-VL chat template: [system], user (images first, then text), assistant prompt.

        The first ``head_length(num_image_tokens, system_prompt)`` ids do not depend on ``user_text``.
        """
        return self._row_ids(user_text, num_image_tokens, system_prompt, suffix_ids)[0]

    def head_length(self, num_image_tokens: list[int], system_prompt: str | None) -> int:
        """How many leading ids of a row depend only on the system prompt and the images, not on its text.

        Rows with the same head share its keys/values in the MLLM (``modeling.prefix_kv``).
        """
        return len(self._head_ids(num_image_tokens, system_prompt))

    def _row_ids(self, user_text: str, num_image_tokens: list[int], system_prompt: str | None,
                 suffix_ids: list[int]) -> tuple[list[int], int]:
        """``chat_ids`` and its ``head_length``, the head tokenised once."""
        head = self._head_ids(num_image_tokens, system_prompt)
        return head + self._tail_ids(user_text, bool(num_image_tokens), suffix_ids), len(head)

    def _head_ids(self, num_image_tokens: list[int], system_prompt: str | None) -> list[int]:
        # The system turn, the user turn's <|im_start|>, and with images "user\n" and the image blocks.
        ids = self.ids
        system = QWEN_DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        out = [ids.im_start, *self.text_ids("system\n" + system), ids.im_end, *self.text_ids("\n"), ids.im_start]
        if num_image_tokens:
            out += self.text_ids("user\n")
            for count in num_image_tokens:
                out += [ids.vision_start, *([ids.image_pad] * count), ids.vision_end]
        return out

    def _tail_ids(self, user_text: str, with_images: bool, suffix_ids: list[int]) -> list[int]:
        # The user's text, the assistant turn's start and the suffix (the metaquery block).
        ids = self.ids
        # Without images "user\n" and the text form one text run, tokenised together.
        out = self.text_ids(user_text if with_images else "user\n" + user_text)
        out += [ids.im_end, *self.text_ids("\n"), ids.im_start, *self.text_ids("assistant\n")]
        return out + list(suffix_ids)

    # -- images ----------------------------------------------------------------------------
    def prepare_image(self, image) -> Image.Image:
        pil = to_pil_rgb(image)
        if min(pil.size) < MIN_IMAGE_SIDE:
            # The processor refuses sides under 28 px; upscale tiny inputs first (aspect kept).
            scale = MIN_IMAGE_SIDE / min(pil.size)
            pil = pil.resize(
                (max(MIN_IMAGE_SIDE, round(pil.size[0] * scale)), max(MIN_IMAGE_SIDE, round(pil.size[1] * scale))),
                Image.BICUBIC,
            )
        return pil

    def process_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values [num_patches, C*T*P*P], image_grid_thw [num_images, 3] (int64)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].to(torch.long)

    def tokens_per_image(self, grid_thw: torch.Tensor) -> list[int]:
        return [int(t * h * w) // (self.merge_size**2) for t, h, w in grid_thw.tolist()]

    # -- batches ---------------------------------------------------------------------------
    def pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad with <|endoftext|> -> input_ids [B, S], attention_mask [B, S]."""
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.ids.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, length - len(row):] = 1
        return input_ids, attention_mask

    def build_batch(
        self,
        rows: list[tuple[str, list[Image.Image]]],
        system_prompt: str | None,
        suffix_ids: list[int] = (),
    ) -> dict:
        """Model inputs for conversations ``(text, images)``; images are already PIL RGB."""
        all_images = [img for _, imgs in rows for img in imgs]
        pixel_values = grid_thw = None
        tokens = []
        if all_images:
            pixel_values, grid_thw = self._process_unique(all_images)
            tokens = self.tokens_per_image(grid_thw)
        id_rows, head_lengths, cursor = [], [], 0
        for text, imgs in rows:
            counts = tokens[cursor: cursor + len(imgs)]
            cursor += len(imgs)
            ids, head_length = self._row_ids(text, counts, system_prompt, suffix_ids)
            id_rows.append(ids)
            head_lengths.append(head_length)
        input_ids, attention_mask = self.pad_left(id_rows)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
            "head_lengths": torch.tensor(head_lengths, dtype=torch.long),  # [B]: see head_length
        }

    def _process_unique(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        # The same input image is often shown in two guidance branches: process it once.
        processed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for img in images:
            if id(img) not in processed:
                processed[id(img)] = self.process_images([img])
        pixel_values = torch.cat([processed[id(img)][0] for img in images], dim=0)
        grid_thw = torch.cat([processed[id(img)][1] for img in images], dim=0)
        return pixel_values, grid_thw
