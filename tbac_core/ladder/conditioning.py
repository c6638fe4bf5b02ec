"""LadderConditioning: what the MLLM says at every depth, and which depth feeds which DiT block.

TBAC-UniImage feeds DiT block ``i`` with the metaquery hidden states of one MLLM layer (a
"rung"). A ``LadderConditioning`` keeps the metaquery states of every rung that was computed, so
the rung-to-block mapping can be changed afterwards without re-running the MLLM.

Rungs are numbered like transformers' ``hidden_states`` tuple: rung 0 = input embeddings, rung
``r`` = output of decoder layer ``r - 1``, rung ``num_layers`` = final-RMSNorm output. The trained
mapping feeds block ``i`` with rung ``num_layers - num_blocks + i`` (the last ``num_blocks`` rungs
before the final norm).

Each DiT block's condition is a *recipe*: a weighted sum of terms ``(source, rung, weight)``,
evaluated in the DiT's caption space (after connector, caption projection and caption norm, which
is what the block's cross-attention reads). A plain encode has one source and one term per block
of weight 1; weighting scales a block's terms and mixing combines the terms of two conditionings.
Working after the norms keeps weights meaningful: both the connector and the caption projection
end in an RMSNorm that would undo any scaling applied before them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch

from ..errors import IncompatibleConditioningError

BRANCHES = ("positive", "negative", "image_negative")


@dataclass(frozen=True)
class ModelIdentity:
    """Enough about a model to refuse conditioning made by an incompatible one."""

    name: str
    fingerprint: str  # hash of the trained metaquery embedding rows, as stored in the checkpoint
    hidden_size: int
    num_rungs: int
    num_metaqueries: int
    num_dit_blocks: int

    def check_compatible(self, other: "ModelIdentity", what: str = "conditioning") -> None:
        if self == other:
            return
        if self.fingerprint != other.fingerprint:
            raise IncompatibleConditioningError(
                f"This {what} was made by model {other.name!r} (fingerprint {other.fingerprint[:12]}, "
                f"hidden size {other.hidden_size}, {other.num_rungs} rungs, {other.num_metaqueries} "
                f"metaqueries, {other.num_dit_blocks} DiT blocks) but is used with {self.name!r} "
                f"(fingerprint {self.fingerprint[:12]}, hidden size {self.hidden_size}, {self.num_rungs} "
                f"rungs, {self.num_metaqueries} metaqueries, {self.num_dit_blocks} DiT blocks). Encode "
                f"the prompt again with the model you sample with."
            )


def fingerprint_tensor(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class RungSource:
    """Metaquery states of one encode: per branch a tensor [num_rungs_kept, batch, N, hidden].

    ``negative`` is the unconditional branch (negative prompt, black images when editing);
    ``image_negative`` (negative prompt with the real input images) exists only for 3-way image
    guidance.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    image_negative: torch.Tensor | None
    prompts: tuple[str, ...]
    negative_prompt: str
    num_input_images: tuple[int, ...] = ()  # per prompt; empty for text-to-image

    @property
    def num_rungs_kept(self) -> int:
        return self.positive.shape[0]

    @property
    def batch_size(self) -> int:
        return self.positive.shape[1]

    def branch(self, name: str) -> torch.Tensor | None:
        return getattr(self, name)


@dataclass(frozen=True)
class BlockTerm:
    source: int
    rung: int
    weight: float = 1.0


@dataclass(frozen=True)
class LadderConditioning:
    """Conditioning for every DiT block, built from one or more encodes ("sources")."""

    sources: tuple[RungSource, ...]
    blocks: tuple[tuple[BlockTerm, ...], ...]  # one recipe per DiT block
    model: ModelIdentity
    attention_mask: torch.Tensor | None = None  # [batch, N]; None = every metaquery attends
    info: dict = field(default_factory=dict, compare=False)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_source(cls, source: RungSource, block_rungs: list[int], model: ModelIdentity, **info):
        blocks = tuple((BlockTerm(0, rung, 1.0),) for rung in block_rungs)
        cond = cls((source,), blocks, model, info=dict(info))
        cond.validate()
        return cond

    # -- views -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def batch_size(self) -> int:
        return max(source.batch_size for source in self.sources)

    @property
    def has_image_guidance(self) -> bool:
        return all(source.image_negative is not None for source in self.sources)

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.sources[0].prompts

    def block_rungs(self) -> list[int]:
        """The rung of the first term of each block (the whole mapping for a plain encode)."""
        return [terms[0].rung for terms in self.blocks]

    def with_blocks(self, blocks) -> "LadderConditioning":
        cond = replace(self, blocks=tuple(tuple(terms) for terms in blocks))
        cond.validate()
        return cond

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        if len(self.blocks) != self.model.num_dit_blocks:
            raise IncompatibleConditioningError(
                f"Conditioning maps {len(self.blocks)} blocks but the model's DiT has "
                f"{self.model.num_dit_blocks}."
            )
        batches = {source.batch_size for source in self.sources}
        if len(batches - {1}) > 1:
            raise IncompatibleConditioningError(
                f"Conditioning sources have batch sizes {sorted(batches)}; mixed sources need the same "
                f"number of prompts (or one prompt, which is broadcast)."
            )
        for index, terms in enumerate(self.blocks):
            if not terms:
                raise IncompatibleConditioningError(f"DiT block {index} has no conditioning term.")
            for term in terms:
                if not 0 <= term.source < len(self.sources):
                    raise IncompatibleConditioningError(f"Block {index} names missing source {term.source}.")
                kept = self.sources[term.source].num_rungs_kept
                if not 0 <= term.rung < kept:
                    raise IncompatibleConditioningError(
                        f"Block {index} reads rung {term.rung}, but this conditioning kept rungs 0..{kept - 1} "
                        f"(the MLLM forward stopped there). Encode again with a layer choice that includes "
                        f"rung {term.rung}."
                    )

    def check_model(self, model: ModelIdentity) -> None:
        model.check_compatible(self.model)

    # -- evaluation ------------------------------------------------------------------------
    def block_conditions(self, branch: str, embed) -> list[torch.Tensor]:
        """Per-block DiT conditions [batch, N, D] for ``branch``.

        ``embed`` maps metaquery states [..., hidden] to the DiT's caption space (connector,
        caption projection, caption norm). Each (source, rung) pair is embedded once.
        """
        cache: dict[tuple[int, int], torch.Tensor] = {}
        batch = self.batch_size
        conditions = []
        for terms in self.blocks:
            total = None
            for term in terms:
                key = (term.source, term.rung)
                if key not in cache:
                    states = self.sources[term.source].branch(branch)
                    if states is None:
                        raise IncompatibleConditioningError(
                            f"Source {term.source} has no {branch!r} branch (it was encoded without input "
                            f"images); image guidance needs every mixed conditioning to come from an edit."
                        )
                    embedded = embed(states[term.rung])
                    cache[key] = embedded.expand(batch, *embedded.shape[1:])
                part = cache[key] if term.weight == 1.0 else cache[key] * term.weight
                total = part if total is None else total + part
            conditions.append(total)
        return conditions

    def to(self, device=None, dtype=None) -> "LadderConditioning":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        sources = tuple(
            replace(s, positive=move(s.positive), negative=move(s.negative), image_negative=move(s.image_negative))
            for s in self.sources
        )
        mask = None if self.attention_mask is None else self.attention_mask.to(device=device)
        return replace(self, sources=sources, attention_mask=mask)
