"""Recipe edits: select, weight and mix ``LadderConditioning`` block recipes without the MLLM.

None of these re-runs the MLLM: they edit the *block recipes* of a conditioning (which rung of
which encode feeds each DiT block, with which weight).

Where the edits apply
---------------------
A block recipe is a weighted sum of terms ``(source, rung, weight)`` evaluated **after** the
connector, the caption projection and the caption norm, i.e. in the DiT's caption space, on
exactly the tensor a block's cross-attention reads (see ``tbac_core.ladder.conditioning``). Weights and mixes
are applied there, not to the MLLM states before the connector, because the connector
(Linear-GELU-Linear-RMSNorm) and the caption projection (Linear-GELU-Linear, then the caption
RMSNorm) each end in an RMSNorm that rescales every token to a fixed size. A weight applied before
them could not change the strength a block sees (``0.5·A`` would come out as large as ``A``, only
bent by the GELUs), and a blend ``(1-t)·A + t·B`` made before them would be re-normalised and
passed through two non-linear MLPs, so it would not be a linear cross-fade. After the norms a
weight scales the condition exactly and a mix is exactly the linear blend the block reads.

Weight semantics
----------------
``weight_blocks`` multiplies the weight of every term of a block by the block's weight, in every
branch (prompt, negative prompt, image-guidance), so guidance is scaled consistently.
Weight 1 changes nothing (bit for bit). Weight ``w`` makes the block's condition ``w·c``.
**Weight 0** makes the block's condition a zero tensor. The block's cross-attention then sees keys
and values that are only its K/V projection biases, identical for every metaquery, so its attention
is uniform and its output is the same constant vector ``to_out(b_v)`` for every image token,
whatever the prompt: that block ignores the prompt (it is exactly sampling with that block's
condition replaced by zeros). Negative weights flip the block's condition.

Mix semantics
-------------
``mix(a, b, spec)`` gives every block a share ``t`` of B (0 = only A, 1 = only B) and the block's
recipe becomes ``(1-t)·(A's recipe) + t·(B's recipe)``. The result's sources are A's followed by
B's (sources no block reads any more are dropped, so a mix with every block from A *is* A); A and B
must come from the same model, have equal batch sizes (or one of them a single prompt, which is
broadcast), and both have or both lack the image-guidance branch of an edit. ``select_layers`` on
a mixed conditioning gives every term of block ``i`` the new rung, so a mix keeps its shares and
changes depth for both prompts.

The spec grammars: ``tbac_core.ladder.layer_spec`` (layers) and ``tbac_core.ladder.block_spec``
(weights and mixes).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch

from ..errors import IncompatibleConditioningError, LayerSpecError
from .block_spec import parse_block_weights, parse_mix_spec
from .conditioning import BlockTerm, LadderConditioning, RungSource
from .layer_spec import parse_layer_spec

__all__ = ["check_mixable", "mix", "select_layers", "weight_blocks"]


# --------------------------------------------------------------------------- select and weight


def select_layers(cond: LadderConditioning, spec: str) -> LadderConditioning:
    """Remap which MLLM rung feeds each DiT block, without running the MLLM again.

    ``spec`` is a layer spec with the encoder's grammar and errors (``tbac_core.ladder.layer_spec``).
    Every term of block ``i`` (of every source, so a mix stays a mix) reads the spec's rung for
    block ``i``; weights are kept. Raises ``LayerSpecError`` for a bad spec and
    ``IncompatibleConditioningError`` when a rung was not kept by the encode.
    """
    identity = cond.model
    mapping = parse_layer_spec(spec, identity.num_rungs, identity.num_dit_blocks)
    for block, (rung, terms) in enumerate(zip(mapping, cond.blocks)):
        for term in terms:
            kept = cond.sources[term.source].num_rungs_kept
            if rung >= kept:
                raise IncompatibleConditioningError(
                    f"Layer spec {spec!r} feeds DiT block {block} with rung {rung}, but this conditioning "
                    f"kept only rungs 0..{kept - 1} (its encode stopped at the deepest rung it needed). "
                    f"Encode again with keep_all_rungs enabled (TBAC Ladder Encode) to remap freely, or "
                    f"pick rungs 0..{kept - 1}."
                )
    blocks = [tuple(replace(term, rung=rung) for term in terms) for rung, terms in zip(mapping, cond.blocks)]
    selected = cond.with_blocks(blocks)
    return replace(selected, info={**cond.info, "layers": spec})


def weight_blocks(cond: LadderConditioning, spec: str) -> LadderConditioning:
    """Scale each block's condition by a per-block weight (``parse_block_weights`` grammar).

    The weights multiply the term weights of each block, in every branch. See the module
    docstring for what weight 0 means (the block ignores the prompt).
    """
    weights = parse_block_weights(spec, cond.num_blocks)
    blocks = [
        tuple(terms) if weight == 1.0 else tuple(replace(t, weight=t.weight * weight) for t in terms)
        for weight, terms in zip(weights, cond.blocks)
    ]
    weighted = cond.with_blocks(blocks)
    return replace(weighted, info={**cond.info, "weights": spec})


# --------------------------------------------------------------------------- mix


def check_mixable(a: LadderConditioning, b: LadderConditioning, what: str = "mix") -> None:
    """Refuse two conditionings that cannot be combined block by block, saying why."""
    a.model.check_compatible(b.model, what="second conditioning")
    if a.model.num_dit_blocks != b.model.num_dit_blocks or a.model.hidden_size != b.model.hidden_size:
        raise IncompatibleConditioningError(
            f"Cannot {what}: the conditionings were made for models of different sizes "
            f"({a.model.num_dit_blocks} vs {b.model.num_dit_blocks} DiT blocks, hidden size "
            f"{a.model.hidden_size} vs {b.model.hidden_size})."
        )
    if a.batch_size != b.batch_size and 1 not in (a.batch_size, b.batch_size):
        raise IncompatibleConditioningError(
            f"Cannot {what}: A has {a.batch_size} prompts and B has {b.batch_size}. Use the same number of "
            f"prompts in both, or a single prompt on one side (it is used for every prompt of the other)."
        )
    if a.has_image_guidance != b.has_image_guidance:
        edit, plain = ("A", "B") if a.has_image_guidance else ("B", "A")
        raise IncompatibleConditioningError(
            f"Cannot {what}: {edit} comes from an edit (it has the image-guidance branch) but {plain} is "
            f"text-to-image. Encode both with input images, or both without."
        )
    if (a.attention_mask is None) != (b.attention_mask is None) or (
        a.attention_mask is not None and not torch.equal(a.attention_mask.cpu(), b.attention_mask.cpu())
    ):
        raise IncompatibleConditioningError(
            f"Cannot {what}: the two conditionings mask their metaqueries differently."
        )


def _scaled(terms, factor: float) -> list[BlockTerm]:
    """Terms times ``factor``; none for 0 (a block fully from the other side), unchanged for 1."""
    if factor == 0.0:
        return []
    return [t if factor == 1.0 else replace(t, weight=t.weight * factor) for t in terms]


def _drop_unused_sources(sources: list[RungSource], blocks: list[list[BlockTerm]]):
    """Keep only the sources some block reads (in order) and renumber the terms."""
    used = sorted({term.source for terms in blocks for term in terms})
    new_index = {old: new for new, old in enumerate(used)}
    blocks = [tuple(replace(t, source=new_index[t.source]) for t in terms) for terms in blocks]
    return tuple(sources[i] for i in used), tuple(blocks)


def mix(a: LadderConditioning, b: LadderConditioning, spec: str | Sequence[float]) -> LadderConditioning:
    """Blend two conditionings block by block: block i = (1 - t_i)·A + t_i·B in caption space.

    ``spec``: a mix spec (``tbac_core.ladder.block_spec``) or one share of B per block in 0..1.
    Raises ``LayerSpecError`` for a bad spec and ``IncompatibleConditioningError`` when A and B
    cannot be mixed (other model, batch sizes, image guidance on one side only).
    """
    check_mixable(a, b)
    num_blocks = a.num_blocks
    if isinstance(spec, str):
        shares = parse_mix_spec(spec, num_blocks)
    else:
        shares = [float(t) for t in spec]
        if len(shares) != num_blocks or not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in shares):
            raise LayerSpecError(
                f"A list of mix shares needs {num_blocks} numbers in 0..1 (one per DiT block), got {list(spec)}."
            )
    # The same encode may sit on both sides (e.g. A and a weighted A): store its tensors once.
    sources = list(a.sources)
    b_index = []
    for source in b.sources:
        found = next((i for i, s in enumerate(sources) if s is source), None)
        if found is None:
            sources.append(source)
            found = len(sources) - 1
        b_index.append(found)
    blocks = []
    for share, terms_a, terms_b in zip(shares, a.blocks, b.blocks):
        terms = _scaled(terms_a, 1.0 - share)
        terms += [replace(t, source=b_index[t.source]) for t in _scaled(terms_b, share)]
        blocks.append(terms)
    sources, blocks = _drop_unused_sources(sources, blocks)
    info = {"mix": spec if isinstance(spec, str) else list(shares)}
    mixed = replace(a, sources=sources, blocks=blocks, info=info)
    mixed.validate()
    return mixed
