"""The frozen Qwen2.5-VL of TBAC-UniImage: building it, naming its weights, reading its ladder.

transformers <=4.51 names the modules ``model.X`` (text decoder) and ``visual.X``; >=4.52 names
them ``model.language_model.X`` and ``model.visual.X``. Checkpoints exist in both layouts, so keys
are compared in one canonical (new) layout whatever version is installed.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..devices import to_host
from .layer_offload import to_device
from .meta_init import empty_weights
from .onednn_linear import use_onednn_linears
from .prefix_kv import (
    RowPrefix,
    cache_keyword,
    cache_with_prefix,
    columns_after_prefix,
    keep_row_head,
    new_cache,
    shared_prefix_length,
)
from .vision_patch_embed import use_linear_patch_embed


def canonical_key(key: str) -> str:
    """Map a Qwen2.5-VL state-dict key of either transformers layout to the >=4.52 layout."""
    if key.startswith(("model.language_model.", "model.visual.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def build_mllm(config_dict: dict, embedding_rows: int) -> tuple[Qwen2_5_VLForConditionalGeneration, int]:
    """Instantiate Qwen2.5-VL on the meta device with ``embedding_rows`` input-embedding rows.

    Returns the model and its base vocabulary size (rows before TBAC's metaquery rows). The LM
    head is not built here: TBAC's checkpoint has none (see ``attach_lm_head``).
    """
    config = Qwen2_5_VLConfig.from_dict(dict(config_dict))
    text_config = getattr(config, "text_config", config)
    base_vocab = int(getattr(text_config, "vocab_size", None) or config.vocab_size)
    for cfg in {id(config): config, id(text_config): text_config}.values():
        if "vocab_size" in cfg.to_dict() or hasattr(cfg, "vocab_size"):
            cfg.vocab_size = embedding_rows
        cfg.use_sliding_window = False
        cfg.sliding_window = None
    config.tie_word_embeddings = False
    config._attn_implementation = "sdpa"
    with empty_weights():
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.lm_head = nn.Identity()  # attached from the embedding after loading
    use_linear_patch_embed(vision_tower(model))  # the kernel-sized Conv3d as a matmul (vision_patch_embed: why)
    use_onednn_linears(model)  # float32 CPU products through oneDNN (onednn_linear: why)
    model.eval().requires_grad_(False)
    return model, base_vocab


class BaseVocabHead(nn.Module):
    """LM head tied to the base-vocabulary rows of the input embedding; it owns no parameter.

    The rows TBAC added (metaqueries, padding) are left out, so ``generate`` can never emit them.
    It reads the embedding at call time instead of holding a view of it: a view registered as a
    parameter becomes a separate copy whenever the model is moved between devices (0.6 GB in bf16
    for Qwen2.5-VL-3B).
    """

    def __init__(self, embedding: nn.Embedding, base_vocab: int):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered, so moves and state_dict skip it
        self.in_features = embedding.embedding_dim
        self.out_features = base_vocab

    @property
    def weight(self) -> torch.Tensor:  # [base_vocab, hidden]
        return self._embedding[0].weight[: self.out_features]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The embedding may rest off the compute device (partial loading): read it where the states are.
        return nn.functional.linear(hidden_states, to_device(self.weight, hidden_states.device))


def attach_lm_head(model: Qwen2_5_VLForConditionalGeneration, base_vocab: int) -> None:
    """Rebuild the (tied) LM head over the base vocabulary; TBAC's checkpoint has none."""
    model.lm_head = BaseVocabHead(model.get_input_embeddings(), base_vocab)


def text_model(model) -> nn.Module:
    """The decoder stack (``.layers``, ``.norm``) in either transformers layout."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def vision_tower(model) -> nn.Module:
    """The vision tower (``visual``) in either transformers layout."""
    return getattr(model.model, "visual", None) or model.visual


def vision_dtype(model) -> torch.dtype:
    return next(vision_tower(model).parameters()).dtype


def num_rungs(model) -> int:
    """Hidden-state entries: embeddings, one per decoder layer but the last, the final norm."""
    return len(text_model(model).layers) + 1


def rope_position_ids(model, input_ids, attention_mask, image_grid_thw, image_token_id) -> torch.Tensor:
    """3-D M-RoPE positions [3, B, S] from the model's own ``get_rope_index``.

    transformers 5 needs ``mm_token_type_ids`` (1 on image tokens) for it; 4.5x does not.
    """
    owner = model.model if hasattr(model.model, "get_rope_index") else model
    get_rope_index = owner.get_rope_index
    kwargs = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in inspect.signature(get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == image_token_id).to(torch.int)
    position_ids, _ = get_rope_index(input_ids, **kwargs)
    return position_ids


class _StopForward(Exception):
    """Raised by a hook once the deepest needed rung is captured, to skip the layers above it."""


@contextmanager
def _capture_rungs(model, rungs: list[int], positions: torch.Tensor, store: dict, check_cancel=None):
    """Hooks that copy the hidden states at ``positions`` [B, N] for each rung in ``rungs``.

    ``check_cancel`` runs at every rung, so a cancelled encode stops within one decoder layer.
    """
    decoder = text_model(model)
    layers = decoder.layers
    last_rung = len(layers)
    deepest = max(rungs)
    handles = []

    def keep(rung, hidden):
        if check_cancel is not None:
            check_cancel()
        if rung in rungs:
            batch = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            store[rung] = hidden[batch, positions.to(hidden.device)]
        if rung == deepest:
            raise _StopForward

    def output_of(value):
        return value[0] if isinstance(value, (tuple, list)) else value

    handles.append(layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    ))
    for index in range(min(deepest, last_rung - 1)):
        handles.append(layers[index].register_forward_hook(
            lambda mod, args, out, rung=index + 1: keep(rung, output_of(out))
        ))
    if deepest == last_rung:
        handles.append(decoder.norm.register_forward_hook(lambda mod, args, out: keep(last_rung, out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def metaquery_rung_states(
    model,
    inputs: dict,
    positions: torch.Tensor,
    rungs: list[int],
    image_token_id: int,
    check_cancel=None,
    grad_enabled: bool = False,
    seen_images: list | None = None,
    prefix: RowPrefix | None = None,
) -> torch.Tensor:
    """Run the MLLM and return hidden states at ``positions`` for ``rungs`` -> [len(rungs), B, N, H].

    The forward stops right after the deepest requested rung: the layers above it, the final norm
    and the LM head are never computed, and no full-sequence hidden states are kept.
    ``grad_enabled``: build the autograd graph (training the metaquery rows); inference leaves it off.
    ``seen_images``: see ``image_features``; pass one list to several calls to share their images.
    ``prefix``: leading columns of an earlier pass (``metaquery_rung_states_keeping_head``); the rows
    run only their columns after the longest prefix they all share with it (``prefix_kv``: why).
    """
    with torch.set_grad_enabled(grad_enabled):
        states, _ = _metaquery_rung_states(model, inputs, positions, rungs, image_token_id, check_cancel,
                                           seen_images, prefix=None if grad_enabled else prefix)
        return states


@torch.no_grad()
def metaquery_rung_states_keeping_head(model, inputs: dict, positions: torch.Tensor, rungs: list[int],
                                       image_token_id: int, row: int, check_cancel=None,
                                       seen_images: list | None = None) -> tuple[torch.Tensor, RowPrefix | None]:
    """``metaquery_rung_states`` (whole rows, no gradients) that also keeps row ``row``'s head
    (``inputs["head_lengths"]``) with its keys/values -> (states, ``RowPrefix`` or None)."""
    return _metaquery_rung_states(model, inputs, positions, rungs, image_token_id, check_cancel, seen_images,
                                  keep_head_of=row)


def _metaquery_rung_states(model, inputs, positions, rungs, image_token_id, check_cancel, seen_images=None, *,
                           prefix: RowPrefix | None = None, keep_head_of: int | None = None
                           ) -> tuple[torch.Tensor, RowPrefix | None]:
    device = model.device  # the first parameter's: resident under partial loading (see layer_offload)
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    grid = inputs.get("image_grid_thw")
    grid = grid.to(device) if grid is not None else None
    position_ids = rope_position_ids(model, input_ids, attention_mask, grid, image_token_id)  # [3, B, S]
    inputs_embeds = model.get_input_embeddings()(input_ids)  # [B, S, H]
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        features = image_features(model, pixel_values, grid, check_cancel, seen_images)  # [image tokens, H]
        image_slots = (input_ids == image_token_id).unsqueeze(-1)  # [B, S, 1]
        if int(image_slots.sum()) != features.shape[0]:  # as transformers checks its own scatter
            raise RuntimeError(f"{int(image_slots.sum())} image tokens but {features.shape[0]} image features; "
                               f"this is a bug, please report it.")
        # Features may come from an earlier encode (seen_images), computed where the MLLM ran then.
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(image_slots, features)
    run = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids,
           "use_cache": False}
    layers_run = min(max(rungs), len(text_model(model).layers))  # decoder layers up to the deepest rung
    shared = 0
    if prefix is not None and layers_run > 0:
        shared = shared_prefix_length(prefix, input_ids, attention_mask, inputs_embeds, position_ids, layers_run)
    cache = None
    if shared:
        after = columns_after_prefix(attention_mask, shared)  # [B, S - P]
        rows = input_ids.shape[0]
        run = {
            "inputs_embeds": inputs_embeds.gather(1, after[..., None].expand(-1, -1, inputs_embeds.shape[-1])),
            "attention_mask": torch.cat([attention_mask.new_ones(rows, shared), attention_mask.gather(1, after)], 1),
            "position_ids": position_ids.gather(2, after[None].expand(position_ids.shape[0], -1, -1)),
            "use_cache": True,
            cache_keyword(model): cache_with_prefix(prefix, shared, layers_run, rows, device, inputs_embeds.dtype),
        }
        positions = positions.to(device) - shared  # the metaqueries follow the prefix
    elif keep_head_of is not None and layers_run > 0:
        cache = new_cache()
        run.update({"use_cache": True, cache_keyword(model): cache})
    store: dict[int, torch.Tensor] = {}
    with _capture_rungs(model, rungs, positions, store, check_cancel):
        try:
            model(**run)
        except _StopForward:
            pass
    states = torch.stack([store[r] for r in rungs], dim=0)
    if cache is None:
        return states, None
    head = int(inputs["head_lengths"][keep_head_of]) if "head_lengths" in inputs else 0
    return states, keep_row_head(cache, keep_head_of, head, input_ids, attention_mask, inputs_embeds, position_ids)


def image_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, check_cancel=None,
                   seen_images: list | None = None) -> torch.Tensor:
    """The vision tower's merged features of a batch of images, each distinct image computed once.

    ``pixel_values`` [sum of patches, C * T * P * P] and ``grid_thw`` [images, 3] as the image
    processor makes them -> [sum of merged tokens, H] in the same image order. Guidance shows the same
    input image in several rows (image-only and full branch of an edit): its patches are identical,
    so its features are computed once and reused. Each distinct image runs alone: transformers 4.5x's
    SDPA vision attention masks one [patches, patches] matrix over all images of a call, a cost that
    grows with the square of the image count (5.x splits the call per image itself).
    ``seen_images``: the (patches, features) pairs already computed, least recently used first,
    extended and reordered here; one list shared by several calls (the row groups of one encode, the
    encodes of a pipeline) computes each image once across all of them.
    """
    visual = vision_tower(model)
    device = model.device
    patch_counts = grid_thw.prod(-1).tolist()
    distinct = [] if seen_images is None else seen_images  # (patches, features) per distinct image, oldest use first
    features = []
    for patches, grid in zip(pixel_values.split(patch_counts), grid_thw.split(1)):
        seen = next((k for k, (p, _) in enumerate(distinct) if p.shape == patches.shape and torch.equal(p, patches)),
                    None)
        if seen is not None:  # used again: it moves to the end, so trimming the front drops the least recently used
            distinct.append(distinct.pop(seen))
            known = distinct[-1][1]
        else:
            if check_cancel is not None:
                check_cancel()
            output = visual(patches.to(device=device, dtype=vision_dtype(model)), grid_thw=grid)
            known = output if isinstance(output, torch.Tensor) else output.pooler_output  # 4.5x / 5.x
            distinct.append((patches, to_host(known)))  # kept in CPU memory between encodes (to_host: why)
        features.append(known.to(device))  # [T * H/merge * W/merge, H]
    return torch.cat(features)
