"""Keys/values of a row's leading columns, kept by the pass that ran them and reused by later rows.

The MLLM rows of one encode begin alike: every row opens with the chat template's system turn, and
an edit's prompt row also shows the same input images as its negative row (``<|im_start|>user\\n``
and the image blocks come before the text). The decoder is causal, so the keys and values of those
leading columns depend on nothing after them. The guidance pass, which runs first, keeps them for
its source row's *head* (the columns before its own text, ``PromptBuilder.head_length``): a
``RowPrefix``. The prompt rows then run only their columns after the longest prefix they share
with it, with its keys/values as their cache.

On the medium model a pass costs ~23 ms of weight reads plus ~0.7 ms a token (fp32, one thread),
so the prompt row of a text-to-image encode skips the system turn's 97 of its 223 tokens; an edit's
prompt row also skips its input images' tokens (256 per image: conditioning images are resized to
256 x 28 x 28 pixels).

Columns are shared only where the ids, the input embeddings (the images' features) and the M-RoPE
positions are all equal, so the result equals the one-pass forward within float rounding (the
matrix products see the prefix and the rest in two calls). Guidance rows always run whole: their
states are cached and reused across encodes, so they depend on their own content only; a prompt
row's states depend on its own content and its encode's guidance rows, never on history.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..devices import to_host

# Per decoder layer: key, value [1, kv_heads, P, head_dim].
PrefixLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RowPrefix:
    """The leading columns of one row, as a pass saw them, and their keys/values in each layer it ran."""

    ids: torch.Tensor  # [P]; all tensors in CPU memory (keep_row_head)
    embeds: torch.Tensor  # [P, H]: the decoder's input (token embeddings, image features in the image slots)
    position_ids: torch.Tensor  # [3, P]: M-RoPE positions
    layers: PrefixLayers

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def left_pads(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Padding columns before each row's tokens -> [B], or None when the rows are not left-padded."""
    if torch.any(attention_mask[:, :-1] > attention_mask[:, 1:]):  # a 1 before a 0
        return None
    return (attention_mask == 0).sum(dim=1)


def keep_row_head(cache: DynamicCache, row: int, head_length: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor) -> RowPrefix | None:
    """The first ``head_length`` columns of row ``row`` of a pass that filled ``cache`` -> ``RowPrefix``.

    ``input_ids``/``attention_mask`` [B, S], ``embeds`` [B, S, H] and ``position_ids`` [3, B, S] are
    the pass's inputs. None when there is nothing to keep (no layer ran, no head, not left-padded).
    """
    pads = left_pads(attention_mask)
    layers = [(layer[0], layer[1]) for layer in cache]  # iteration yields key, value first in 4.5x and 5.x
    if pads is None or head_length <= 0 or not layers:
        return None
    start = int(pads[row])
    columns = slice(start, start + head_length)
    return RowPrefix(
        ids=_cpu_copy(input_ids[row, columns]),
        embeds=_cpu_copy(embeds[row, columns]),
        position_ids=_cpu_copy(position_ids[:, row, columns]),
        layers=[(_cpu_copy(key[row:row + 1, :, columns]), _cpu_copy(value[row:row + 1, :, columns]))
                for key, value in layers],
    )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A compact copy in CPU memory. Kept heads wait there between encodes (~1 MB for a text row, ~12 MB
    more per input image at real size), so the GPU memory stays free for sampling; each prompt pass
    brings the part it uses to its device."""
    return tensor.clone() if tensor.device.type == "cpu" else to_host(tensor)


def shared_prefix_length(prefix: RowPrefix, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         embeds: torch.Tensor, position_ids: torch.Tensor, layers_needed: int) -> int:
    """How many leading columns every row shares with ``prefix`` (ids, embeddings and positions) -> P.

    0 when the prefix cannot serve: too few layers kept, rows not left-padded, another dtype. Every
    row keeps at least one column of its own to run.
    """
    pads = left_pads(attention_mask)
    if pads is None or len(prefix.layers) < layers_needed or prefix.embeds.dtype != embeds.dtype:
        return 0
    rows, length = input_ids.shape
    span = min(prefix.length, int((length - pads).min()) - 1)
    if span <= 0:
        return 0
    device = input_ids.device
    columns = pads.to(device)[:, None] + torch.arange(span, device=device)  # [B, P]
    same = input_ids.gather(1, columns) == prefix.ids[:span].to(device)
    same &= (position_ids.gather(2, columns[None].expand(position_ids.shape[0], -1, -1))
             == prefix.position_ids[:, None, :span].to(device)).all(dim=0)
    same &= (embeds.gather(1, columns[..., None].expand(-1, -1, embeds.shape[-1]))
             == prefix.embeds[None, :span].to(embeds.device)).all(dim=-1)
    return int(same.int().cumprod(dim=1).sum(dim=1).min())  # the shortest run of equal columns


def columns_after_prefix(attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """For left-padded rows [B, S] that start with a shared prefix: each row's columns without it -> [B, S - P].

    Row ``b`` is ``pads_b`` padding, the prefix, then its own tokens; the indices keep its padding and
    its own tokens, in order (the padding then sits between the cached prefix and the row's tokens,
    masked out).
    """
    rows, length = attention_mask.shape
    pads = left_pads(attention_mask)
    kept = torch.arange(length - prefix_length, device=attention_mask.device).expand(rows, -1)
    return kept + prefix_length * (kept >= pads[:, None])


def cache_with_prefix(prefix: RowPrefix, prefix_length: int, layers: int, rows: int, device, dtype) -> DynamicCache:
    """A fresh cache holding the first ``prefix_length`` columns of the first ``layers`` layers for
    ``rows`` rows; the run appends to it, never to ``prefix``.

    Filled with ``update`` layer by layer: the one way that works alike in transformers 4.5x and 5.x
    (4.55's constructor from tensors leaves an empty first layer).
    """
    cache = DynamicCache()
    for index, (key, value) in enumerate(prefix.layers[:layers]):
        key, value = (t[:, :, :prefix_length].to(device=device, dtype=dtype).expand(rows, -1, -1, -1)
                      for t in (key, value))
        cache.update(key, value, index)
    return cache
