"""The keys/values of the token prefix every MLLM row starts with, computed once and shared.

Every row TBAC-UniImage's MLLM reads for conditioning begins with the same tokens: the chat
template's system turn (``<|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>``). The
decoder is causal, so those tokens' keys and values depend on nothing after them. ``PrefixKVCache``
keeps them while the weights that made them are unchanged, and each row runs only its tokens after
the prefix, with the prefix as its key/value cache (``mllm.metaquery_rung_states``).

Rows always run this way, the first one included, so a row's result never depends on what ran
before it. It equals the one-pass forward within float rounding: the matrix products see the prefix
and the rest as two calls instead of one.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

# Per decoder layer: key, value [1, kv_heads, P, head_dim] of one row's prefix.
PrefixLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Entry:
    ids: tuple[int, ...]
    weights: tuple  # stamp of the decoder's tensors (weights_stamp) and its device
    layers: PrefixLayers


class PrefixKVCache:
    """Holds the keys/values of the most recent prefix; recomputed when the prefix or the weights change.

    One entry: the system prompt is fixed per checkpoint, so one prefix serves every encode.
    """

    def __init__(self):
        self._entry: _Entry | None = None
        self.computed = 0  # prefixes run through the decoder
        self.reused = 0  # encodes served from the cache

    def layers(self, ids: tuple[int, ...], weights: tuple, compute: Callable[[], PrefixLayers]) -> PrefixLayers:
        entry = self._entry
        if entry is not None and entry.ids == ids and entry.weights == weights:
            self.reused += 1
            return entry.layers
        layers = compute()
        self._entry = _Entry(ids, weights, layers)
        self.computed += 1
        return layers

    def clear(self) -> None:
        self._entry = None


@dataclass(frozen=True)
class SharedPrefix:
    """The prefix ids every row of an encode starts with, and the cache of their keys/values."""

    ids: tuple[int, ...]
    cache: PrefixKVCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_layers(cache: DynamicCache) -> PrefixLayers:
    """A filled cache's per-layer (key, value); its iteration yields them first in every transformers version."""
    return [(layer[0], layer[1]) for layer in cache]


def cache_with_prefix(layers: PrefixLayers, rows: int) -> DynamicCache:
    """A fresh cache holding the prefix for ``rows`` rows; the run appends to it, never to ``layers``.

    Filled with ``update`` layer by layer: the one way that works alike in transformers 4.5x and 5.x
    (4.55's constructor from tensors leaves an empty first layer).
    """
    cache = DynamicCache()
    for index, (key, value) in enumerate(layers):
        cache.update(key.expand(rows, -1, -1, -1), value.expand(rows, -1, -1, -1), index)
    return cache


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def columns_after_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prefix_ids: tuple[int, ...]) -> torch.Tensor | None:
    """For left-padded rows [B, S]: each row's column indices without its prefix -> [B, S - P], or None.

    Row ``b`` is ``pads_b`` padding, the prefix, then its own tokens; the indices keep its padding and
    its own tokens, in order, so the result is again a left-padded batch. None when some row does not
    start with ``prefix_ids`` (then the rows run whole).
    """
    prefix_length = len(prefix_ids)
    rows, length = input_ids.shape
    if prefix_length == 0 or length <= prefix_length:
        return None
    pads = (attention_mask == 0).sum(dim=1)  # [B]; left padding only (pad_left)
    if torch.any(attention_mask[:, :-1] > attention_mask[:, 1:]):  # a 1 before a 0: not left padding
        return None
    if torch.any(length - pads <= prefix_length):
        return None
    prefix = torch.tensor(prefix_ids, dtype=input_ids.dtype, device=input_ids.device)
    span = torch.arange(prefix_length, device=input_ids.device)
    if not torch.equal(input_ids.gather(1, pads[:, None] + span), prefix.expand(rows, -1)):
        return None
    kept = torch.arange(length - prefix_length, device=input_ids.device).expand(rows, -1)
    return kept + prefix_length * (kept >= pads[:, None])  # [B, S - P]
