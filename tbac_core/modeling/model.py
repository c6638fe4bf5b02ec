"""``TBACModel``: the loaded parts of TBAC-UniImage, and the encode that turns prompts into ladder conditioning.

Build one with ``tbac_core.loading.load_model`` (the loader lives in ``loading``, so this module
does not depend on the checkpoint format).
"""
from __future__ import annotations

import threading
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from PIL import Image

from ..errors import InvalidParameterError
from ..ladder.conditioning import LadderConditioning, ModelIdentity, RungSource
from ..ladder.layer_spec import default_rungs, parse_layer_spec
from ..loading.components import TBACConfig
from ..processing.prompt_layout import (
    conditioning_rows,
    metaquery_positions,
    metaquery_suffix,
)
from ..processing.images import image_fingerprint
from ..processing.prompting import PromptBuilder
from .dit import LadderDiT
from .mllm import metaquery_rung_states


@dataclass
class TBACModel:
    """A loaded TBAC-UniImage: frozen MLLM, ladder DiT, DC-AE and the scheduler config."""

    config: TBACConfig
    checkpoint_dir: Path
    mllm: torch.nn.Module
    base_vocab: int
    prompts: PromptBuilder
    dit: LadderDiT
    vae: AutoencoderDC
    scheduler_config: dict
    identity: ModelIdentity
    # Serialises MLLM runs: layer capture puts hooks on the shared MLLM for the duration of a run.
    mllm_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.dit.device

    @property
    def latent_channels(self) -> int:
        return self.dit.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (DC-AE f32: 32)."""
        return self.config.vae_downsample_f

    def metaquery_suffix(self) -> list[int]:
        return metaquery_suffix(self.prompts.ids, self.base_vocab, self.config.num_metaqueries)

    def default_block_rungs(self) -> list[int]:
        return default_rungs(self.identity.num_rungs, self.identity.num_dit_blocks)

    def block_rungs(self, layers: str | list[int] | None) -> list[int]:
        """One MLLM rung per DiT block from a layer spec (see ``layer_spec``) or a list of rungs."""
        count, blocks = self.identity.num_rungs, self.identity.num_dit_blocks
        if layers is None or isinstance(layers, str):
            return parse_layer_spec(layers or "default", count, blocks)
        try:
            rungs = [int(r) for r in layers]
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(
                f"layers must be a layer spec (text) or a list of {blocks} integer rungs, got {layers!r}."
            ) from exc
        if len(rungs) != blocks or not all(0 <= r < count for r in rungs):
            raise InvalidParameterError(
                f"A layer list needs {blocks} rungs (one per DiT block) in 0..{count - 1}, got {rungs}."
            )
        return rungs

    # -- encoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        prompts: str | list[str],
        images: list[list[Image.Image]] | None = None,
        negative_prompt: str = "",
        layers: str | list[int] | None = "default",
        keep_all_rungs: bool = False,
        check_cancel=None,
        block_rungs: list[int] | None = None,
        guidance_row_cache: MutableMapping | None = None,
    ) -> LadderConditioning:
        """Encode prompts (and input images for editing) into a ``LadderConditioning``.

        ``images``: None (text-to-image) or one list of images per prompt, as
        ``processing.images.images_per_prompt`` returns it (the pipeline normalises user input).
        ``layers``: a layer spec or one rung per DiT block; ``block_rungs``: the same, already
        resolved (``layers`` is then only the label). The MLLM stops after the deepest rung needed
        unless ``keep_all_rungs``. ``check_cancel()`` runs at every decoder layer and may raise.
        ``guidance_row_cache``: keeps the guidance rows' states across encodes (see ``_rung_states``).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidParameterError("No prompt given: pass at least one prompt (it may be empty).")
        if block_rungs is None:
            block_rungs = self.block_rungs(layers)
        deepest = self.identity.num_rungs - 1 if keep_all_rungs else max(block_rungs)

        rows = conditioning_rows(self.prompts, prompts, images, negative_prompt)
        guidance_rows = len(rows) - len(prompts)  # the negative branches come first
        states = self._rung_states(rows, guidance_rows, deepest, check_cancel, guidance_row_cache)  # [rungs, rows, N, H]
        batch = len(prompts)
        if images is None:
            source = RungSource(states[:, 1:], states[:, :1], None, tuple(prompts), negative_prompt)
        else:
            source = RungSource(
                positive=states[:, 2 * batch:],
                negative=states[:, :batch],
                image_negative=states[:, batch: 2 * batch],
                prompts=tuple(prompts),
                negative_prompt=negative_prompt,
                num_input_images=tuple(len(imgs) for imgs in images),
            )
        return LadderConditioning.from_source(source, block_rungs, self.identity, layers=str(layers))

    def _rung_states(self, rows: list[tuple[str, list]], guidance_rows: int, deepest: int, check_cancel=None,
                     guidance_row_cache: MutableMapping | None = None) -> torch.Tensor:
        """The MLLM states of ``rows`` at rungs 0..``deepest`` -> [rungs, rows, N, H].

        The first ``guidance_rows`` rows (negative prompt, with the black or the input images) are
        each encoded alone, so their states depend on that row only: a new prompt with the same
        negative prompt and images finds them in ``guidance_row_cache`` (keyed by text, image
        content and depth) and only its own rows run through the MLLM. The prompt rows are encoded
        as one batch. One image list is shared by every call, so each distinct image still goes
        through the vision tower once per encode.
        """
        seen_images: list = []
        this_encode: dict = {}  # rows repeated within this encode (prompts sharing their images) run once
        guidance = []
        for text, images in rows[:guidance_rows]:
            key = (text, tuple(image_fingerprint(image) for image in images), deepest)
            if key in this_encode:
                states = this_encode[key]
            elif guidance_row_cache is not None and key in guidance_row_cache:
                states = guidance_row_cache[key]
            else:
                states = self._run_rows([(text, images)], deepest, check_cancel, seen_images)  # [rungs, 1, N, H]
                if guidance_row_cache is not None:
                    guidance_row_cache[key] = states
            this_encode[key] = states
            guidance.append(states)
        prompt_rows = self._run_rows(rows[guidance_rows:], deepest, check_cancel, seen_images)
        return torch.cat([*guidance, prompt_rows], dim=1)

    def _run_rows(self, rows: list[tuple[str, list]], deepest: int, check_cancel, seen_images: list) -> torch.Tensor:
        """One MLLM batch of ``rows`` -> [deepest + 1, rows, N, H]."""
        batch = self.prompts.build_batch(rows, self.config.system_prompt, self.metaquery_suffix())
        positions = metaquery_positions(batch["input_ids"], self.prompts.ids, self.config.num_metaqueries)
        with self.mllm_lock:
            return metaquery_rung_states(self.mllm, batch, positions, list(range(deepest + 1)),
                                         self.prompts.ids.image_pad, check_cancel, seen_images=seen_images)
