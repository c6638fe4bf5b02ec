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

from ..devices import to_host
from ..errors import InvalidParameterError
from ..ladder.conditioning import LadderConditioning, ModelIdentity, RungSource
from ..ladder.layer_spec import default_rungs, parse_layer_spec
from ..loading.components import TBACConfig
from ..processing.images import image_fingerprint
from ..processing.prompt_layout import (
    conditioning_rows,
    guidance_groups,
    metaquery_positions,
    metaquery_suffix,
)
from ..processing.prompting import PromptBuilder
from .dit import LadderDiT
from .mllm import metaquery_rung_states, metaquery_rung_states_keeping_head
from .prefix_kv import RowPrefix


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
        seen_images: list | None = None,
    ) -> LadderConditioning:
        """Encode prompts (and input images for editing) into a ``LadderConditioning``.

        ``images``: None (text-to-image) or one list of images per prompt, as
        ``processing.images.images_per_prompt`` returns it (the pipeline normalises user input).
        ``layers``: a layer spec or one rung per DiT block; ``block_rungs``: the same, already
        resolved (``layers`` is then only the label). The MLLM stops after the deepest rung needed
        unless ``keep_all_rungs``. ``check_cancel()`` runs at every decoder layer and may raise.
        ``guidance_row_cache``: keeps the guidance rows' states across encodes (see ``_rung_states``).
        ``seen_images``: the vision features of images already seen (``mllm.image_features``),
        extended here; pass the same list to later encodes and an image seen before is not run again.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidParameterError("No prompt given: pass at least one prompt (it may be empty).")
        if block_rungs is None:
            block_rungs = self.block_rungs(layers)
        deepest = self.identity.num_rungs - 1 if keep_all_rungs else max(block_rungs)

        rows = conditioning_rows(self.prompts, prompts, images, negative_prompt)
        groups = guidance_groups(len(prompts), images is not None)
        states = self._rung_states(rows, groups, deepest, check_cancel, guidance_row_cache,
                                   seen_images)  # [rungs, rows, N, H]
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

    def _rung_states(self, rows: list[tuple[str, list]], guidance: list[list[int]], deepest: int, check_cancel=None,
                     guidance_row_cache: MutableMapping | None = None, seen_images: list | None = None
                     ) -> torch.Tensor:
        """The MLLM states of ``rows`` at rungs 0..``deepest`` -> [rungs, rows, N, H].

        The guidance rows (negative prompt with the black or the input images; ``guidance`` groups
        their indices, per prompt, as ``guidance_groups`` does) run as one MLLM batch per group, so
        their states depend on that group only: a new prompt with the same negative prompt and
        images finds them in ``guidance_row_cache`` (keyed by text, image content and depth) and
        only its own rows run. The prompt rows run as one batch after them, only their columns after
        what they share with the first group's last row (the system turn, and an edit's input
        images): that row's head keys/values are kept with the group's states (``prefix_kv``: why).
        One image list (``seen_images``, or a new one) is shared by every batch, so each distinct
        image goes through the vision tower at most once.
        """
        seen_images = [] if seen_images is None else seen_images
        this_encode: dict = {}  # groups repeated within this encode (prompts sharing their images) run once
        states: dict[int, torch.Tensor] = {}  # row index -> [rungs, N, H]
        prefix = None  # the first group's last row's head: what the prompt rows skip
        for group in guidance:
            group_rows = [rows[i] for i in group]
            content = tuple((text, tuple(image_fingerprint(image) for image in images)) for text, images in group_rows)
            key = (content, deepest)
            if key in this_encode:
                group_states, head = this_encode[key]
            elif guidance_row_cache is not None and key in guidance_row_cache:
                group_states, head = guidance_row_cache[key]
            else:
                group_states, head = self._run_rows(group_rows, deepest, check_cancel, seen_images,
                                                    keep_head_of=len(group_rows) - 1)  # [rungs, rows, N, H]
                if guidance_row_cache is not None:  # kept in CPU memory between encodes (to_host: why)
                    guidance_row_cache[key] = to_host(group_states), head
            this_encode[key] = group_states, head
            if group is guidance[0]:
                prefix = head
            states.update({i: group_states[:, k] for k, i in enumerate(group)})
        prompt_indices = [i for i in range(len(rows)) if i not in states]
        prompt_states, _ = self._run_rows([rows[i] for i in prompt_indices], deepest, check_cancel, seen_images,
                                          prefix=prefix)
        states.update({i: prompt_states[:, k] for k, i in enumerate(prompt_indices)})
        return torch.stack([states[i].to(prompt_states.device) for i in range(len(rows))], dim=1)

    def _run_rows(self, rows: list[tuple[str, list]], deepest: int, check_cancel, seen_images: list, *,
                  prefix: RowPrefix | None = None, keep_head_of: int | None = None
                  ) -> tuple[torch.Tensor, RowPrefix | None]:
        """One MLLM batch of ``rows`` -> ([deepest + 1, rows, N, H], the head of row ``keep_head_of`` or None).

        ``prefix``: the rows run only their columns after what they share with it.
        """
        batch = self.prompts.build_batch(rows, self.config.system_prompt, self.metaquery_suffix())
        positions = metaquery_positions(batch["input_ids"], self.prompts.ids, self.config.num_metaqueries)
        rungs = list(range(deepest + 1))
        image_pad = self.prompts.ids.image_pad
        with self.mllm_lock:
            if keep_head_of is not None:
                return metaquery_rung_states_keeping_head(self.mllm, batch, positions, rungs, image_pad, keep_head_of,
                                                          check_cancel, seen_images=seen_images)
            return metaquery_rung_states(self.mllm, batch, positions, rungs, image_pad, check_cancel,
                                         seen_images=seen_images, prefix=prefix), None
