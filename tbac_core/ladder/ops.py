"""Ladder controls: select, weight, mix, inspect, save and load a ``LadderConditioning``.

None of these re-runs the MLLM: they edit the *block recipes* of a conditioning (which rung of
which encode feeds each DiT block, with which weight) or read its stored metaquery states.

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

Mix spec grammar (``parse_mix_spec``)
-------------------------------------
Case-insensitive, whitespace tolerant; comma-separated items applied left to right (later items
override earlier ones). Every block starts from A. Items:

``[BLOCKS:]VALUE``
    BLOCKS (absent = all blocks): ``*``, ``all``, one block ``3`` or an inclusive range ``0-9`` /
    ``0..9`` (``9-0`` runs the other way, which matters for fades); block indices are 0..B-1.
    VALUE: ``a`` (t = 0), ``b`` (t = 1), a number t in 0..1 (the share of B: ``0.25`` is
    0.75·A + 0.25·B), ``fade`` / ``a->b`` (t from 0 on the first selected block to 1 on the last),
    ``b->a`` (1 to 0), or ``T1->T2`` with both numbers in 0..1.
``fade FIRST-LAST``
    a cross-fade between two blocks: blocks before FIRST from A, FIRST..LAST from t = 0 to 1,
    blocks after LAST from B (FIRST <= LAST).
a list of letters, one per block, like ``aaaabbbb`` or ``a a b b``
    block i from the i-th letter; the list must name every block.

Examples (20 blocks): ``0-9:a, 10-19:b`` (layout from A, details from B), ``fade``,
``fade 5-14``, ``b, 0-4:a``, ``0.5``, ``10-19: 0->0.7``.

Files
-----
``save_conditioning`` writes ``.safetensors``: tensors ``source.<i>.<branch>`` (and
``attention_mask``) plus, in the safetensors metadata, ``tbac_format`` / ``tbac_format_version``
and ``tbac_conditioning``: JSON with the model identity, each source's prompts, negative prompt
and input-image counts, the block recipes and the conditioning's info. Loading reads only
safetensors and JSON (no pickle), checks every field, and refuses files of another model.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConditioningFileError, IncompatibleConditioningError
from .conditioning import (
    BRANCHES,
    BlockTerm,
    LadderConditioning,
    ModelIdentity,
    RungSource,
)
from .layer_spec import (
    LayerSpecError,
    describe_mapping,
    parse_block_weights,
    parse_layer_spec,
)

__all__ = [
    "FILE_EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MIX_SPEC_SYNTAX",
    "ConditioningFileError",
    "block_similarity",
    "check_mixable",
    "describe_conditioning",
    "inspect",
    "load_conditioning",
    "mix",
    "parse_mix_spec",
    "rung_norms",
    "rung_similarity",
    "save_conditioning",
    "select_layers",
    "weight_blocks",
]

MIX_SPEC_SYNTAX = (
    "comma-separated items '[BLOCKS:]VALUE' applied left to right, every block starting from A; BLOCKS is "
    "'*', 'all', an index like 3 or a range like 0-9 / 0..9; VALUE is 'a', 'b', a share of B from 0 to 1 "
    "like 0.25, 'fade' (= 'a->b'), 'b->a' or a ramp like '0->0.7'; or 'fade FIRST-LAST' (A before FIRST, "
    "B after LAST); or one letter per block like 'aabb'"
)
FORMAT_NAME = "tbac-ladder-conditioning"
FORMAT_VERSION = 1
FILE_EXTENSION = ".safetensors"
MAX_SOURCES_PLOTTED = 4


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


# --------------------------------------------------------------------------- mix spec


def _mix_error(spec: object, problem: str, hint: str | None = None) -> LayerSpecError:
    text = repr(spec)
    text = text if len(text) <= 120 else text[:115] + "...'"
    hint = hint if hint is not None else f"Valid syntax: {MIX_SPEC_SYNTAX}."
    return LayerSpecError(f"Invalid mix spec {text}: {problem}. {hint}")


_BLOCK_RANGE_RE = re.compile(r"([+-]?[0-9]+)\s*(?:\.\.|-)\s*([+-]?[0-9]+)")
_INDEX_RE = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?")
_RAMP_RE = re.compile(r"(.*?)\s*->\s*(.*)")
_FADE_BETWEEN_RE = re.compile(r"fade\s+(.+)")
_LETTERS_RE = re.compile(r"[ab](?:\s*[ab])+")


def _block_index(text: str, spec: str, num_blocks: int) -> int:
    if len(text) > 12 or not 0 <= int(text) < num_blocks:
        raise _mix_error(spec, f"block {text} is out of range", f"Blocks are 0..{num_blocks - 1} for this model.")
    return int(text)


def _mix_blocks(text: str, spec: str, num_blocks: int) -> list[int]:
    """The blocks a BLOCKS selector names, in the order written."""
    if text in ("*", "all"):
        return list(range(num_blocks))
    if _INDEX_RE.fullmatch(text):
        return [_block_index(text, spec, num_blocks)]
    match = _BLOCK_RANGE_RE.fullmatch(text)
    if match:
        first, last = (_block_index(end, spec, num_blocks) for end in match.groups())
        step = 1 if last >= first else -1
        return list(range(first, last + step, step))
    if not text:
        raise _mix_error(spec, "a block selector is missing before ':'")
    raise _mix_error(spec, f"{text!r} is not a block selector")


def _share(text: str, spec: str) -> float:
    """One share of B: 'a', 'b' or a number in 0..1."""
    if text == "a":
        return 0.0
    if text == "b":
        return 1.0
    if not _NUMBER_RE.fullmatch(text):
        raise _mix_error(spec, f"{text!r} is not 'a', 'b' or a number" if text else "a value is missing")
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise _mix_error(
            spec,
            f"share {text} is outside 0..1",
            "A share of B must lie in 0..1 (0 = A, 1 = B); use the Weight node to strengthen a block.",
        )
    return value


def _ramp(start: float, end: float, count: int) -> list[float]:
    if count == 1:
        return [start]
    # start*(1-u) + end*u is exact at both ends (first block exactly start, last exactly end).
    return [start * (1 - i / (count - 1)) + end * (i / (count - 1)) for i in range(count)]


def _mix_values(text: str, count: int, spec: str) -> list[float]:
    """The shares of B a VALUE gives to ``count`` selected blocks."""
    if text == "fade":
        return _ramp(0.0, 1.0, count)
    match = _RAMP_RE.fullmatch(text)
    if match:
        if not match.group(1) or not match.group(2):
            raise _mix_error(spec, f"the ramp {text!r} needs a value on each side of '->', like 'a->b' or '0->0.7'")
        return _ramp(_share(match.group(1), spec), _share(match.group(2), spec), count)
    return [_share(text, spec)] * count


def parse_mix_spec(spec: str, num_blocks: int) -> list[float]:
    """The share of B (0 = A, 1 = B) for each of ``num_blocks`` DiT blocks.

    See the module docstring for the grammar. Raises ``LayerSpecError`` (what was wrong and the
    valid syntax) for a malformed spec, an empty one, a block out of range or a share outside 0..1.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a whole number >= 1, got {num_blocks!r}.")
    if not isinstance(spec, str):
        raise _mix_error(spec, f"expected a string, got {type(spec).__name__}")
    if not spec.strip():
        raise _mix_error(spec, "it is empty (write e.g. 'fade' or '0-9:a, 10-19:b')")
    shares = [0.0] * num_blocks
    for raw in spec.split(","):
        item = " ".join(raw.lower().split())
        if not item:
            raise _mix_error(spec, "it has an empty item (two commas in a row or a stray comma)")
        if ":" in item:
            blocks_text, _, value_text = item.partition(":")
            blocks = _mix_blocks(blocks_text.strip(), spec, num_blocks)
            values = _mix_values(value_text.strip(), len(blocks), spec)
        elif _LETTERS_RE.fullmatch(item):
            letters = item.replace(" ", "")
            if len(letters) != num_blocks:
                raise _mix_error(
                    spec,
                    f"the letter list {letters!r} names {len(letters)} blocks but the DiT has {num_blocks}",
                    f"Write one letter (a or b) per block, e.g. {'a' * (num_blocks // 2) + 'b' * (num_blocks - num_blocks // 2)!r}.",
                )
            blocks, values = list(range(num_blocks)), [0.0 if c == "a" else 1.0 for c in letters]
        elif _FADE_BETWEEN_RE.fullmatch(item):
            range_text = _FADE_BETWEEN_RE.fullmatch(item).group(1)
            match = _BLOCK_RANGE_RE.fullmatch(range_text)
            if not match:
                raise _mix_error(spec, f"'fade' needs two blocks like 'fade 5-14', got {range_text!r}")
            first, last = (_block_index(end, spec, num_blocks) for end in match.groups())
            if first > last:
                raise _mix_error(spec, f"'fade {first}-{last}' runs backwards; write the lower block first "
                                       f"(to fade from B to A, swap the inputs or write '{last}-{first}:b->a')")
            blocks = list(range(num_blocks))
            values = [0.0] * first + _ramp(0.0, 1.0, last - first + 1) + [1.0] * (num_blocks - 1 - last)
        else:
            blocks = list(range(num_blocks))
            values = _mix_values(item, num_blocks, spec)
        for block, value in zip(blocks, values):
            shares[block] = value
    return shares


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

    ``spec``: a mix spec (see the module docstring) or one share of B per block in 0..1.
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


# --------------------------------------------------------------------------- inspect


def rung_norms(source: RungSource, branch: str = "positive") -> torch.Tensor:
    """L2 norm of every metaquery state: [num_rungs_kept, batch, num_metaqueries] float32."""
    states = source.branch(branch)
    if states is None:
        raise IncompatibleConditioningError(f"This source has no {branch!r} branch.")
    return states.float().norm(dim=-1).cpu()


def _pair_batches(x: torch.Tensor, y: torch.Tensor, batch_dim: int):
    bx, by = x.shape[batch_dim], y.shape[batch_dim]
    if bx != by and 1 not in (bx, by):
        raise IncompatibleConditioningError(
            f"Cannot compare {bx} prompts with {by}: use the same number, or one prompt on one side."
        )
    shape = list(x.shape)
    shape[batch_dim] = max(bx, by)
    return x.expand(shape), y.expand(shape)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim, averaged over metaqueries (dim -2)."""
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).mean(dim=-1)


def rung_similarity(cond: LadderConditioning, other: LadderConditioning, branch: str = "positive") -> torch.Tensor:
    """Cosine similarity of the metaquery states, per rung and prompt: [rungs kept by both, batch].

    Compares the first source of each conditioning (for a mix: the A side it was made from),
    token by token before the connector, averaged over the metaqueries.
    """
    cond.model.check_compatible(other.model, what="compared conditioning")
    x, y = cond.sources[0].branch(branch), other.sources[0].branch(branch)
    rungs = min(x.shape[0], y.shape[0])
    x, y = _pair_batches(x[:rungs].cpu(), y[:rungs].cpu(), batch_dim=1)
    return _cosine(x, y)


def block_similarity(
    cond: LadderConditioning,
    other: LadderConditioning,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    branch: str = "positive",
) -> torch.Tensor:
    """Cosine similarity of what each DiT block reads, per block and prompt: [num_blocks, batch].

    With ``embed`` (``model.dit.embed_condition``) the block recipes are evaluated in caption space,
    exactly as sampling does. Without it they are evaluated on the metaquery states themselves
    (before the connector), which needs no model but only approximates what the block sees.
    """
    cond.model.check_compatible(other.model, what="compared conditioning")
    embed = embed if embed is not None else (lambda states: states)
    with torch.no_grad():
        mine = cond.block_conditions(branch, embed)
        theirs = other.block_conditions(branch, embed)
    rows = []
    for x, y in zip(mine, theirs):
        x, y = _pair_batches(x.cpu(), y.cpu(), batch_dim=0)
        rows.append(_cosine(x, y))
    return torch.stack(rows)


def _is_plain(cond: LadderConditioning) -> bool:
    return len(cond.sources) == 1 and all(len(t) == 1 and t[0].weight == 1.0 for t in cond.blocks)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_row(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def describe_conditioning(cond: LadderConditioning) -> str:
    """A few lines an artist can read: model, prompts, rungs kept, which rung feeds which block."""
    identity = cond.model
    lines = [
        f"Model {identity.name!r}: {identity.num_rungs} MLLM rungs (0 = embeddings, {identity.num_rungs - 1} = "
        f"final norm), {identity.num_dit_blocks} DiT blocks, {identity.num_metaqueries} metaqueries. "
        f"Batch {cond.batch_size}, image guidance: {'yes' if cond.has_image_guidance else 'no'}."
    ]
    for index, source in enumerate(cond.sources):
        prompts = "; ".join(repr(_short(p)) for p in source.prompts)
        lines.append(
            f"Source s{index}: prompts {prompts}; negative {_short(source.negative_prompt)!r}; "
            f"rungs kept 0..{source.num_rungs_kept - 1}"
            + (f"; input images {list(source.num_input_images)}" if source.num_input_images else "")
        )
    rungs = [{t.rung for t in terms} for terms in cond.blocks]
    if all(len(r) == 1 for r in rungs):
        lines.append("Mapping: " + describe_mapping([r.pop() for r in rungs], identity.num_rungs))
    if not _is_plain(cond):
        lines.append("Block recipes (weight x source[rung], evaluated after the connector):")
        for index, terms in enumerate(cond.blocks):
            recipe = " + ".join(f"{t.weight:.4g} x s{t.source}[{t.rung}]" for t in terms)
            lines.append(f"  block {index}: {recipe}")
    return "\n".join(lines)


def _summary(cond, other, norms, rung_sim, block_sim, embedded: bool) -> str:
    lines = [describe_conditioning(cond)]
    for index, source_norms in enumerate(norms):
        per_rung = source_norms.mean(dim=(1, 2)).tolist()
        lines.append(f"Metaquery-state norm of s{index} per rung 0..{len(per_rung) - 1} (mean over prompts "
                     f"and metaqueries): {_format_row(per_rung)}")
    if other is not None:
        lines.append("Compared with: " + "; ".join(repr(_short(p)) for p in other.prompts))
        lines.append(f"Cosine similarity per rung 0..{rung_sim.shape[0] - 1} (first source of each, before "
                     f"the connector, mean over prompts): {_format_row(rung_sim.mean(dim=1).tolist())}")
        space = "in the DiT's caption space" if embedded else "on the metaquery states (no model given)"
        lines.append(f"Cosine similarity per DiT block 0..{block_sim.shape[0] - 1} ({space}, mean over "
                     f"prompts): {_format_row(block_sim.mean(dim=1).tolist())}")
    return "\n".join(lines)


def _padded(rows: torch.Tensor, total: int) -> torch.Tensor:
    """[kept, ...] -> [total, ...], NaN (drawn grey, 'not kept') beyond the kept rows."""
    if rows.shape[0] >= total:
        return rows[:total]
    pad = torch.full((total - rows.shape[0], *rows.shape[1:]), float("nan"))
    return torch.cat([rows, pad])


def _recipe_matrix(cond: LadderConditioning, source: int) -> torch.Tensor:
    """[num_rungs, num_blocks]: the weight with which block i reads rung r of ``source`` (NaN: not read)."""
    matrix = torch.full((cond.model.num_rungs, cond.num_blocks), float("nan"))
    for block, terms in enumerate(cond.blocks):
        for term in terms:
            if term.source == source:
                previous = matrix[term.rung, block]
                matrix[term.rung, block] = term.weight if torch.isnan(previous) else previous + term.weight
    return matrix


def _heatmap(fig, ax, values, *, title, xlabel, ylabel, cmap, vmin=None, vmax=None, annotate=False, label=""):
    import numpy as np

    data = np.ma.masked_invalid(values.numpy())
    colormap = _colormap(cmap)
    image = ax.imshow(data, aspect="auto", cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    rows, cols = values.shape
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(r) for r in range(rows)], fontsize=6 if rows > 24 else 7)
    step = max(1, cols // 32)
    ax.set_xticks(range(0, cols, step))
    ax.tick_params(axis="x", labelsize=6 if cols > 24 else 7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(label, fontsize=7)
    cells = [(rc, v) for rc, v in np.ndenumerate(values.numpy()) if not math.isnan(v)]
    if annotate and len(cells) <= 200:
        for (r, c), value in cells:
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=5.5 if rows > 24 else 8)
    return image


def _colormap(name: str):
    """A copy of a matplotlib colormap that draws missing values (NaN) light grey."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def _plot(cond, other, norms, rung_sim, block_sim, embedded: bool):
    """The inspect figure as a PIL image (matplotlib's Agg canvas: no display, no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    identity = cond.model
    num_rungs = identity.num_rungs
    shown = min(len(cond.sources), MAX_SOURCES_PLOTTED)
    rows = shown + (1 if other is not None else 0)
    row_height = max(2.6, 0.13 * max(num_rungs, identity.num_dit_blocks) + 1.4)
    fig = Figure(figsize=(13, row_height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    rung_label = f"MLLM rung (0 embeddings .. {num_rungs - 1} final norm)"
    for index in range(shown):
        source = cond.sources[index]
        more = f" (+{len(source.prompts) - 1} more)" if len(source.prompts) > 1 else ""
        prompt = f"'{_short(source.prompts[0], 44)}'{more}"
        left, right = axes[index]
        per_token = _padded(norms[index].mean(dim=1), num_rungs)  # [num_rungs, N], mean over prompts
        _heatmap(fig, left, per_token, title=f"s{index} {prompt}\nmetaquery-state norm (red rungs feed a block)",
                 xlabel="metaquery index", ylabel=rung_label, cmap="viridis", label="L2 norm")
        recipe = _recipe_matrix(cond, index)
        used = [r for r in range(num_rungs) if not torch.isnan(recipe[r]).all()]
        for rung in used:  # mark the mapping on the norm map too
            tick = left.get_yticklabels()[rung]
            tick.set_color("red")
            tick.set_fontweight("bold")
        limit = max(1.0, float(np.nanmax(np.abs(recipe.numpy()))) if used else 1.0)
        _heatmap(fig, right, recipe, title=f"s{index}: which rung feeds which DiT block\n(cell = weight; grey = not read; dark = rung not kept)",
                 xlabel="DiT block", ylabel=rung_label, cmap="coolwarm", vmin=-limit, vmax=limit, annotate=True,
                 label="weight")
        for rung in range(source.num_rungs_kept, num_rungs):  # rungs the encode did not keep
            right.axhspan(rung - 0.5, rung + 0.5, color="#bbbbbb", alpha=0.5, linewidth=0)
    if other is not None:
        left, right = axes[shown]
        # Similar prompts stay close to 1 everywhere: start the colour scale just below the lowest value.
        low = float(min(rung_sim.min(), block_sim.min()))
        vmin = max(-1.0, min(0.9, math.floor((low - 0.05) * 10) / 10))
        _heatmap(fig, left, _padded(rung_sim, num_rungs), title="cosine similarity per rung (first sources)",
                 xlabel="prompt", ylabel=rung_label, cmap="RdYlGn", vmin=vmin, vmax=1, annotate=True,
                 label="cosine")
        space = "caption space" if embedded else "metaquery states"
        _heatmap(fig, right, block_sim, title=f"cosine similarity per DiT block ({space})", xlabel="prompt",
                 ylabel="DiT block", cmap="RdYlGn", vmin=vmin, vmax=1, annotate=True, label="cosine")
    if len(cond.sources) > shown:
        fig.suptitle(f"{len(cond.sources) - shown} more sources not drawn (see the summary)", fontsize=8)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")


def inspect(
    cond: LadderConditioning,
    other: LadderConditioning | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Heat-maps and a text summary of a conditioning (and its similarity to ``other``).

    The image has, per source (up to four): the metaquery-state norm per rung x metaquery index
    (mean over prompts; red marks = rungs some block reads) and the block recipe as a rung x DiT
    block map whose cells are the weights; with ``other``, the cosine similarity per rung x prompt
    (``rung_similarity``) and per DiT block x prompt (``block_similarity``, in caption space when
    ``embed`` is given). Grey cells: rungs not kept by the encode. Returns ``(PIL image, str)``.
    """
    norms = [rung_norms(source) for source in cond.sources]
    rung_sim = block_sim = None
    if other is not None:
        rung_sim = rung_similarity(cond, other)
        block_sim = block_similarity(cond, other, embed)
    image = _plot(cond, other, norms, rung_sim, block_sim, embed is not None)
    return image, _summary(cond, other, norms, rung_sim, block_sim, embed is not None)


# --------------------------------------------------------------------------- save / load


def _json_safe(value):
    """``info`` values that JSON can hold exactly; anything else is stored as its str()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _document(cond: LadderConditioning) -> dict:
    return {
        "model": asdict(cond.model),
        "sources": [
            {
                "prompts": list(s.prompts),
                "negative_prompt": s.negative_prompt,
                "num_input_images": list(s.num_input_images),
                "image_guidance": s.image_negative is not None,
            }
            for s in cond.sources
        ],
        # JSON writes floats with repr(), which reads back to the same float: recipes round-trip exactly.
        "blocks": [[[t.source, t.rung, t.weight] for t in terms] for terms in cond.blocks],
        "attention_mask": cond.attention_mask is not None,
        "info": _json_safe(cond.info),
    }


def _tensors(cond: LadderConditioning) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, source in enumerate(cond.sources):
        for branch in BRANCHES:
            states = source.branch(branch)
            if states is not None:
                # clone: encode's branches are views of one tensor, and safetensors refuses shared memory.
                tensors[f"source.{index}.{branch}"] = states.detach().to("cpu").contiguous().clone()
    if cond.attention_mask is not None:
        tensors["attention_mask"] = cond.attention_mask.detach().to("cpu").contiguous().clone()
    return tensors


def save_conditioning(cond: LadderConditioning, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``cond`` to a ``.safetensors`` file atomically; returns the path written.

    The file appears complete or not at all (written to a temporary file in the same folder, then
    renamed). An existing file is kept and ``FileExistsError`` raised unless ``overwrite``.
    """
    from safetensors.torch import save_file

    cond.validate()
    path = Path(path)
    if path.suffix != FILE_EXTENSION:
        raise ConditioningFileError(f"A saved conditioning must end in {FILE_EXTENSION}, got {path.name!r}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting.")
    metadata = {
        "tbac_format": FORMAT_NAME,
        "tbac_format_version": str(FORMAT_VERSION),
        "tbac_conditioning": json.dumps(_document(cond), allow_nan=False, ensure_ascii=False),
    }
    tensors = _tensors(cond)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        if overwrite:
            os.replace(temp_name, path)
        else:
            _rename_no_replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def _rename_no_replace(source: str, target: Path) -> None:
    """Rename without ever replacing an existing file (a hard link fails if the target exists)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise FileExistsError(f"{target} already exists; choose another name or allow overwriting.") from None
    except OSError:  # file systems without hard links: check, then rename (a small race remains)
        if target.exists():
            raise FileExistsError(f"{target} already exists; choose another name or allow overwriting.") from None
        os.replace(source, target)


def _field(document: dict, key: str, kind, where: str):
    if not isinstance(document, dict) or key not in document:
        raise ValueError(f"{where} lacks {key!r}")
    value = document[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"{where}.{key} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _parse_identity(document: dict) -> ModelIdentity:
    model = _field(document, "model", dict, "metadata")
    values = {}
    for item in fields(ModelIdentity):
        kind = int if item.type in ("int", int) else str
        values[item.name] = _field(model, item.name, kind, "model")
    return ModelIdentity(**values)


def _parse_blocks(document: dict) -> tuple:
    blocks = []
    for index, terms in enumerate(_field(document, "blocks", list, "metadata")):
        if not isinstance(terms, list):
            raise ValueError(f"block {index} is not a list of terms")
        parsed = []
        for term in terms:
            if (not isinstance(term, list) or len(term) != 3 or any(isinstance(v, bool) for v in term)
                    or not isinstance(term[0], int) or not isinstance(term[1], int)
                    or not isinstance(term[2], (int, float)) or not math.isfinite(term[2])):
                raise ValueError(f"block {index} has a malformed term {term!r} (expected [source, rung, weight])")
            parsed.append(BlockTerm(term[0], term[1], float(term[2])))
        blocks.append(tuple(parsed))
    return tuple(blocks)


def _check_states(name: str, states: torch.Tensor, identity: ModelIdentity) -> None:
    if states.ndim != 4 or states.shape[2] != identity.num_metaqueries or states.shape[3] != identity.hidden_size:
        raise ValueError(
            f"tensor {name!r} has shape {list(states.shape)}; expected [rungs, batch, "
            f"{identity.num_metaqueries}, {identity.hidden_size}] for this model"
        )
    if not 1 <= states.shape[0] <= identity.num_rungs or states.shape[1] < 1:
        raise ValueError(f"tensor {name!r} has {states.shape[0]} rungs and batch {states.shape[1]}")
    if not states.is_floating_point():
        raise ValueError(f"tensor {name!r} holds {states.dtype}, not floating-point states")
    if not torch.isfinite(states).all():
        raise ValueError(f"tensor {name!r} holds NaN or infinite values")


def _parse_sources(document: dict, tensors: dict, identity: ModelIdentity) -> tuple[RungSource, ...]:
    sources = []
    entries = _field(document, "sources", list, "metadata")
    if not entries:
        raise ValueError("it has no sources")
    for index, entry in enumerate(entries):
        where = f"sources[{index}]"
        prompts = _field(entry, "prompts", list, where)
        counts = _field(entry, "num_input_images", list, where)
        if not all(isinstance(p, str) for p in prompts) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ValueError(f"{where} has malformed prompts or image counts")
        branches = {}
        for branch in BRANCHES:
            name = f"source.{index}.{branch}"
            if branch == "image_negative" and not _field(entry, "image_guidance", bool, where):
                continue
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is missing")
            _check_states(name, tensors[name], identity)
            branches[branch] = tensors[name]
        positive = branches["positive"]
        for branch, states in branches.items():
            if states.shape[0] != positive.shape[0] or states.shape[1] not in (1, positive.shape[1]):
                raise ValueError(f"tensor 'source.{index}.{branch}' does not match the positive branch's shape")
        if len(prompts) != positive.shape[1]:
            raise ValueError(f"{where} names {len(prompts)} prompts but holds a batch of {positive.shape[1]}")
        sources.append(RungSource(
            positive=positive,
            negative=branches["negative"],
            image_negative=branches.get("image_negative"),
            prompts=tuple(prompts),
            negative_prompt=_field(entry, "negative_prompt", str, where),
            num_input_images=tuple(counts),
        ))
    return tuple(sources)


def load_conditioning(path: str | os.PathLike, expected: ModelIdentity | None = None) -> LadderConditioning:
    """Read a conditioning written by ``save_conditioning`` (safetensors + JSON, nothing executable).

    ``expected``: the identity of the model it will be used with; a file made by another model is
    refused with ``IncompatibleConditioningError``. Missing, malformed or corrupt files raise
    ``ConditioningFileError`` saying what is wrong. Tensors come back on the CPU in their saved dtype.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConditioningFileError(f"No saved conditioning at {path}: the file does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ConditioningFileError(
            f"{path} is not a readable .safetensors file (corrupt, truncated or another format): {exc}"
        ) from exc
    if metadata.get("tbac_format") != FORMAT_NAME:
        raise ConditioningFileError(
            f"{path} is a safetensors file but not a saved TBAC ladder conditioning (no "
            f"tbac_format={FORMAT_NAME!r} in its metadata); it may be a model checkpoint or another tool's file."
        )
    version = metadata.get("tbac_format_version")
    if version != str(FORMAT_VERSION):
        raise ConditioningFileError(
            f"{path} uses conditioning file format version {version!r}; this version of the pack reads "
            f"version {FORMAT_VERSION}. Update the pack (or re-save it with this version)."
        )
    try:
        document = json.loads(metadata.get("tbac_conditioning", ""))
        identity = _parse_identity(document)
    except (ValueError, TypeError) as exc:
        raise ConditioningFileError(f"{path} has malformed conditioning metadata: {exc}.") from exc
    if expected is not None:
        try:
            expected.check_compatible(identity, what=f"saved conditioning ({path.name})")
        except IncompatibleConditioningError as exc:
            raise IncompatibleConditioningError(f"{exc} (file: {path})") from None
    try:
        sources = _parse_sources(document, tensors, identity)
        blocks = _parse_blocks(document)
        mask = None
        if _field(document, "attention_mask", bool, "metadata"):
            if "attention_mask" not in tensors:
                raise ValueError("tensor 'attention_mask' is missing")
            mask = tensors["attention_mask"]
        expected_keys = {f"source.{i}.{b}" for i, s in enumerate(sources) for b in BRANCHES if s.branch(b) is not None}
        extra = set(tensors) - expected_keys - ({"attention_mask"} if mask is not None else set())
        if extra:
            raise ValueError(f"it holds unexpected tensors {sorted(extra)}")
        info = document.get("info", {})
        cond = LadderConditioning(sources, blocks, identity, attention_mask=mask,
                                  info=info if isinstance(info, dict) else {})
        cond.validate()
    except (ValueError, TypeError, IncompatibleConditioningError) as exc:
        raise ConditioningFileError(f"{path} is not a valid saved conditioning: {exc}.") from exc
    return cond
