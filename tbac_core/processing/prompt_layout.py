"""The prompt layout of one encode: which MLLM rows are built, and where the metaqueries sit.

Every row is a Qwen2.5-VL conversation (system, user: images then text, assistant) followed by
the metaquery suffix ``<|vision_start|><|img0|>...<|imgN-1|><|vision_end|><|im_end|>``. The
DiT is conditioned on the MLLM's hidden states at the N metaquery positions. Guidance needs
several rows per prompt; their order is the batch order the sampler's guidance expects.
"""
from __future__ import annotations

import torch
from PIL import Image

from .prompting import PromptBuilder, SpecialIds


def metaquery_suffix(ids: SpecialIds, base_vocab: int, num_metaqueries: int) -> list[int]:
    """The suffix ids; the metaquery tokens are the embedding rows right after the base vocabulary."""
    queries = [base_vocab + i for i in range(num_metaqueries)]
    return [ids.vision_start, *queries, ids.vision_end, ids.im_end]


def black_like(image: Image.Image) -> Image.Image:
    """The official null image of image guidance: black, same size as the input."""
    return Image.new("RGB", image.size)


def conditioning_rows(
    builder: PromptBuilder,
    prompts: list[str],
    per_prompt_images: list[list[Image.Image]] | None,
    negative_prompt: str,
) -> list[tuple[str, list[Image.Image]]]:
    """MLLM rows of one encode: ``(text, images)`` in guidance-branch order.

    Text-to-image (B + 1 rows): [negative, *prompts] (the negative row is shared by every prompt).
    Editing (3 * B rows): [negative + black images] * B, [negative + input images] * B,
    [prompt + input images] * B. ``per_prompt_images`` comes from
    ``processing.images.images_per_prompt`` (PIL RGB).
    """
    captions = [builder.truncate_caption(p) for p in prompts]
    negative = builder.truncate_caption(negative_prompt)
    if per_prompt_images is None:
        return [(negative, [])] + [(caption, []) for caption in captions]
    # Prepared once per distinct input, so an image shared by prompts and branches stays one object.
    prepared: dict[int, Image.Image] = {}
    for img in (img for imgs in per_prompt_images for img in imgs):
        if id(img) not in prepared:
            prepared[id(img)] = builder.prepare_image(img)
    pil = [[prepared[id(img)] for img in imgs] for imgs in per_prompt_images]
    black = [[black_like(img) for img in imgs] for imgs in pil]
    return ([(negative, imgs) for imgs in black] + [(negative, imgs) for imgs in pil]
            + [(caption, imgs) for caption, imgs in zip(captions, pil)])


def guidance_groups(num_prompts: int, with_images: bool) -> list[list[int]]:
    """The guidance rows of ``conditioning_rows``' layout, grouped per prompt -> row indices per group.

    Text-to-image: one group, the shared negative row. Editing: per prompt, its negative row with
    the black images and its negative row with the input images (same images, so same length).
    """
    if not with_images:
        return [[0]]
    return [[i, num_prompts + i] for i in range(num_prompts)]


def metaquery_positions(input_ids: torch.Tensor, ids: SpecialIds, num_metaqueries: int) -> torch.Tensor:
    """Positions strictly between each row's last <|vision_start|> and last <|vision_end|> -> [B, N]."""
    seq = input_ids.shape[1]
    index = torch.arange(seq)
    last_start = torch.where(input_ids == ids.vision_start, index, -1).max(dim=1).values
    last_end = torch.where(input_ids == ids.vision_end, index, -1).max(dim=1).values
    if not bool(((last_end - last_start) == num_metaqueries + 1).all()):
        raise RuntimeError("Prompt rendering lost the metaquery slots; this is a bug, please report it.")
    return last_start[:, None] + 1 + torch.arange(num_metaqueries)[None, :]
