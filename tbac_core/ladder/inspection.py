"""Reading a ``LadderConditioning``: metrics (norms, similarities), a text summary, ``inspect``.

The metrics read the stored metaquery states (or, for ``block_similarity`` with an ``embed``, what
each DiT block's cross-attention reads); the figure is drawn by ``tbac_core.ladder.plot``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import IncompatibleConditioningError
from .conditioning import LadderConditioning, RungSource
from .layer_spec import describe_mapping
from .plot import draw_inspection
from .text import shorten

__all__ = ["block_similarity", "describe_conditioning", "inspect", "rung_norms", "rung_similarity"]


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
        prompts = "; ".join(repr(shorten(p)) for p in source.prompts)
        lines.append(
            f"Source s{index}: prompts {prompts}; negative {shorten(source.negative_prompt)!r}; "
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
        lines.append("Compared with: " + "; ".join(repr(shorten(p)) for p in other.prompts))
        lines.append(f"Cosine similarity per rung 0..{rung_sim.shape[0] - 1} (first source of each, before "
                     f"the connector, mean over prompts): {_format_row(rung_sim.mean(dim=1).tolist())}")
        space = "in the DiT's caption space" if embedded else "on the metaquery states (no model given)"
        lines.append(f"Cosine similarity per DiT block 0..{block_sim.shape[0] - 1} ({space}, mean over "
                     f"prompts): {_format_row(block_sim.mean(dim=1).tolist())}")
    return "\n".join(lines)


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
    image = draw_inspection(cond, other, norms, rung_sim, block_sim, embed is not None)
    return image, _summary(cond, other, norms, rung_sim, block_sim, embed is not None)
