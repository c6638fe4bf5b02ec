"""Loading a TBAC-UniImage checkpoint into ready-to-run modules, and encoding prompts.

Every module is built on the meta device from its config and receives the checkpoint's tensors
once, already in the target dtype and on the target device: nothing is initialised randomly,
no base Qwen/SANA weights are read first, nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderDC, SanaTransformer2DModel
from PIL import Image
from transformers import AutoTokenizer

from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ComponentNotFoundError, InvalidParameterError
from ..ladder.conditioning import (
    LadderConditioning,
    ModelIdentity,
    RungSource,
    fingerprint_tensor,
)
from ..ladder.layer_spec import default_rungs, parse_layer_spec
from ..loading import builtin_configs
from ..loading.checkpoint import CheckpointFiles, read_checkpoint_config
from ..loading.components import ComponentConfigs, TBACConfig, load_json, search_dirs
from ..processing.prompting import PromptBuilder, make_image_processor
from ..quantization.hook import load_component_state, open_checkpoint_files
from .dit import Connector, LadderDiT
from .mllm import (
    attach_lm_head,
    build_mllm,
    canonical_key,
    metaquery_rung_states,
    num_rungs,
    text_model,
)

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
EMBED_KEY = "model.language_model.embed_tokens.weight"  # canonical layout


def load_strict(module: torch.nn.Module, state: dict, source: str, rename=None) -> None:
    """Assign ``state`` to a meta-device ``module``; any missing/unexpected/mis-shaped key is an error.

    ``rename`` maps both sides to a common naming (used for the two transformers layouts).
    """
    rename = rename or (lambda key: key)
    expected = {rename(k): (k, tuple(v.shape)) for k, v in module.state_dict().items()}
    given = {rename(k): v for k, v in state.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(given[k].shape)}, model {expected[k][1]})"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != expected[k][1]
    )
    if missing or unexpected or mismatched:
        lines = [f"The weights in {source} do not fit the {type(module).__name__} built from its config:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        lines.append("The checkpoint and its component configs come from different models.")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({expected[k][0]: v for k, v in given.items()}, strict=True, assign=True)


def find_tokenizer_dir(candidates: list[Path | None]) -> Path:
    for folder in candidates:
        if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    looked = ", ".join(str(c) for c in candidates if c is not None) or "(nowhere)"
    raise ComponentNotFoundError(
        "No Qwen2.5 tokenizer found. Looked in: " + looked + ". Put tokenizer.json (or vocab.json + "
        "merges.txt + tokenizer_config.json) of Qwen2.5-VL-3B-Instruct in the checkpoint folder, place "
        "the Qwen2.5-VL-3B-Instruct folder next to it, or pass tokenizer_dir."
    )


def load_tokenizer(folder: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # a bare vocab.json/merges.txt folder without a tokenizer class
        try:
            from transformers import Qwen2TokenizerFast as tokenizer_class
        except ImportError:
            from transformers import Qwen2Tokenizer as tokenizer_class
        try:
            tokenizer = tokenizer_class.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            raise ComponentNotFoundError(f"Cannot load a Qwen2.5 tokenizer from {folder}: {exc}") from exc
    return tokenizer


def image_processor_settings(folders: list[Path | None]) -> dict:
    for folder in folders:
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            return load_json(folder / "preprocessor_config.json")
    return dict(builtin_configs.QWEN25_VL_IMAGE_PROCESSOR)


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

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        vae_dtype: str | torch.dtype | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        models_dirs: list[str | os.PathLike] | None = None,
        name: str | None = None,
        quantization: str | None = None,
    ) -> "TBACModel":
        """``quantization``: ``"fp8"``, ``"q8_0"``, ``"q5_k"`` or ``"q4_k"`` quantises the linears of the
        MLLM's decoder layers and the DiT's blocks while loading; a folder written by ``quantize`` is
        read as it is stored without it (see ``tbac_core.quantization``)."""
        checkpoint_dir = Path(checkpoint_dir)
        raw_config = read_checkpoint_config(checkpoint_dir)
        config = TBACConfig.from_dict(raw_config, str(checkpoint_dir / "config.json"))
        files = open_checkpoint_files(checkpoint_dir)  # safetensors, or model.gguf
        extra_dirs = search_dirs(models_dirs)
        components = ComponentConfigs.resolve(config, checkpoint_dir, extra_dirs)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if vae_dtype is None:
            # DC-AE overflows in float16 (black images); bfloat16 and float32 are safe.
            vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        vae_dtype = resolve_dtype(vae_dtype, device)

        tokenizer_path = find_tokenizer_dir(
            [Path(tokenizer_dir) if tokenizer_dir else None, checkpoint_dir, components.mllm_dir]
        )
        tokenizer = load_tokenizer(tokenizer_path)
        processor_settings = image_processor_settings([tokenizer_path, components.mllm_dir, checkpoint_dir])
        prompts = PromptBuilder(tokenizer, make_image_processor(processor_settings), config.max_input_text_tokens,
                                processor_settings)

        mllm, base_vocab, fingerprint = cls._load_mllm(files, components.mllm, config, dtype, device, quantization)
        dit = cls._load_dit(files, components.transformer, mllm, dtype, device, quantization)
        vae = cls._load_vae(files, components.vae, vae_dtype, device)
        identity = ModelIdentity(
            name=name or checkpoint_dir.name,
            fingerprint=fingerprint,
            hidden_size=mllm.get_input_embeddings().weight.shape[1],
            num_rungs=num_rungs(mllm),
            num_metaqueries=config.num_metaqueries,
            num_dit_blocks=dit.num_blocks,
        )
        return cls(config, checkpoint_dir, mllm, base_vocab, prompts, dit, vae, dict(components.scheduler), identity)

    @staticmethod
    def _load_mllm(files: CheckpointFiles, mllm_config: dict, config: TBACConfig, dtype, device, quantization=None):
        shapes = {canonical_key(k): v for k, v in files.shapes("mllm").items()}
        if EMBED_KEY not in shapes:
            raise CheckpointError(f"{files.describe()} has no MLLM input embedding ({EMBED_KEY}).")
        rows = shapes[EMBED_KEY][0]
        model, base_vocab = build_mllm(mllm_config, rows)
        if rows != base_vocab + config.num_metaqueries + 2:
            raise CheckpointError(
                f"The MLLM embedding in {files.describe()} has {rows} rows, but vocab_size {base_vocab} + "
                f"num_metaqueries {config.num_metaqueries} + 2 = {base_vocab + config.num_metaqueries + 2}. "
                f"The MLLM config does not belong to this checkpoint."
            )
        state = load_component_state(files, "mllm", model, dtype, device, quantization, rename=canonical_key)
        load_strict(model, state, files.describe(), rename=canonical_key)
        attach_lm_head(model, base_vocab)
        model.to(device)
        fingerprint = _metaquery_fingerprint(files, base_vocab, config.num_metaqueries)
        return model, base_vocab, fingerprint

    @staticmethod
    def _load_dit(files: CheckpointFiles, transformer_config: dict, mllm, dtype, device, quantization=None) -> LadderDiT:
        with init_empty_weights():
            transformer = SanaTransformer2DModel.from_config(transformer_config)
            connector = Connector(text_model(mllm).norm.weight.shape[0], transformer.config.caption_channels)
        load_strict(transformer, load_component_state(files, "dit", transformer, dtype, device, quantization),
                    files.describe())
        load_strict(connector, files.load_component("connector", dtype, device), files.describe())
        dit = LadderDiT(transformer, connector).to(device)
        return dit.eval().requires_grad_(False)

    @staticmethod
    def _load_vae(files: CheckpointFiles, vae_config: dict, dtype, device) -> AutoencoderDC:
        with init_empty_weights():
            vae = AutoencoderDC.from_config(vae_config)
        load_strict(vae, files.load_component("vae", dtype, device), files.describe())
        return vae.to(device).eval().requires_grad_(False)

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.dit.device

    @property
    def latent_channels(self) -> int:
        return self.dit.transformer.config.in_channels

    @property
    def vae_scale(self) -> int:
        return self.config.vae_downsample_f

    def metaquery_suffix(self) -> list[int]:
        """``<|vision_start|><|img0|>...<|imgN-1|><|vision_end|><|im_end|>`` as ids.

        The metaquery tokens are the embedding rows right after the base vocabulary.
        """
        ids = self.prompts.ids
        queries = [self.base_vocab + i for i in range(self.config.num_metaqueries)]
        return [ids.vision_start, *queries, ids.vision_end, ids.im_end]

    def default_block_rungs(self) -> list[int]:
        return default_rungs(self.identity.num_rungs, self.identity.num_dit_blocks)

    # -- encoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        prompts: str | list[str],
        images=None,
        negative_prompt: str = "",
        layers: str | list[int] | None = "default",
        keep_all_rungs: bool = False,
        check_cancel=None,
    ) -> LadderConditioning:
        """Encode prompts (and input images for editing) into a ``LadderConditioning``.

        ``images``: None (text-to-image), or per prompt a list of images (one list shared by all
        prompts may be given as a flat list). ``layers``: a layer spec (see ``layer_spec``) or a
        list with one rung per DiT block. The MLLM stops after the deepest rung needed unless
        ``keep_all_rungs``. ``check_cancel()`` runs at every decoder layer and may raise to stop.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidParameterError("No prompt given: pass at least one prompt (it may be empty).")
        per_prompt_images = _images_per_prompt(images, len(prompts))
        block_rungs = self._block_rungs(layers)
        deepest = self.identity.num_rungs - 1 if keep_all_rungs else max(block_rungs)

        rows = self.conditioning_rows(prompts, per_prompt_images, negative_prompt)
        states = self._rung_states(rows, deepest, check_cancel)  # [rungs, rows, N, H]
        batch = len(prompts)
        if per_prompt_images is None:
            source = RungSource(states[:, 1:], states[:, :1], None, tuple(prompts), negative_prompt)
        else:
            source = RungSource(
                positive=states[:, 2 * batch:],
                negative=states[:, :batch],
                image_negative=states[:, batch: 2 * batch],
                prompts=tuple(prompts),
                negative_prompt=negative_prompt,
                num_input_images=tuple(len(imgs) for imgs in per_prompt_images),
            )
        return LadderConditioning.from_source(source, block_rungs, self.identity, layers=str(layers))

    def _block_rungs(self, layers) -> list[int]:
        count, blocks = self.identity.num_rungs, self.identity.num_dit_blocks
        if layers is None or isinstance(layers, str):
            return parse_layer_spec(layers or "default", count, blocks)
        rungs = [int(r) for r in layers]
        if len(rungs) != blocks or not all(0 <= r < count for r in rungs):
            raise InvalidParameterError(
                f"A layer list needs {blocks} rungs (one per DiT block) in 0..{count - 1}, got {rungs}."
            )
        return rungs

    def conditioning_rows(self, prompts: list[str], per_prompt_images, negative_prompt: str):
        """MLLM rows of one encode: ``(text, images)`` in branch order.

        Text-to-image: [negative, *prompts] (the negative row is shared by every prompt).
        Editing: [negative + black images] * B, [negative + input images] * B, [prompt + images] * B.
        """
        builder = self.prompts
        captions = [builder.truncate_caption(p) for p in prompts]
        negative = builder.truncate_caption(negative_prompt)
        if per_prompt_images is None:
            return [(negative, [])] + [(caption, []) for caption in captions]
        pil = [[builder.prepare_image(img) for img in imgs] for imgs in per_prompt_images]
        black = [[_black_like(img) for img in imgs] for imgs in pil]
        return ([(negative, imgs) for imgs in black] + [(negative, imgs) for imgs in pil]
                + [(caption, imgs) for caption, imgs in zip(captions, pil)])

    def _rung_states(self, rows: list[tuple[str, list]], deepest: int, check_cancel=None) -> torch.Tensor:
        batch = self.prompts.build_batch(rows, self.config.system_prompt, self.metaquery_suffix())
        positions = metaquery_positions(batch["input_ids"], self.prompts.ids, self.config.num_metaqueries)
        return metaquery_rung_states(
            self.mllm, batch, positions, list(range(deepest + 1)), self.prompts.ids.image_pad, check_cancel
        )


def metaquery_positions(input_ids: torch.Tensor, ids, num_metaqueries: int) -> torch.Tensor:
    """Positions strictly between each row's last <|vision_start|> and last <|vision_end|> -> [B, N]."""
    seq = input_ids.shape[1]
    index = torch.arange(seq)
    last_start = torch.where(input_ids == ids.vision_start, index, -1).max(dim=1).values
    last_end = torch.where(input_ids == ids.vision_end, index, -1).max(dim=1).values
    if not bool(((last_end - last_start) == num_metaqueries + 1).all()):
        raise RuntimeError("Prompt rendering lost the metaquery slots; this is a bug, please report it.")
    return last_start[:, None] + 1 + torch.arange(num_metaqueries)[None, :]


def _metaquery_fingerprint(files: CheckpointFiles, base_vocab: int, num_metaqueries: int) -> str:
    key = next(k for k in files.components["mllm"] if canonical_key(k[len("model.mllm_backbone."):]) == EMBED_KEY)
    rows = files.read_rows(key, base_vocab, base_vocab + num_metaqueries)
    return fingerprint_tensor(rows)


def _images_per_prompt(images, num_prompts: int):
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0 or all(img is None for img in images):
        return None
    nested = all(isinstance(item, (list, tuple)) for item in images)
    if not nested:
        # A flat list is the set of input images shared by every prompt.
        return [list(images)] * num_prompts
    if len(images) != num_prompts:
        raise InvalidParameterError(
            f"Got image lists for {len(images)} prompts but {num_prompts} prompts; give one list of input "
            f"images per prompt, or one flat list shared by all prompts."
        )
    if any(len(imgs) == 0 for imgs in images):
        raise InvalidParameterError("Every prompt of an edit batch needs at least one input image.")
    return [list(imgs) for imgs in images]


def _black_like(image: Image.Image) -> Image.Image:
    """The official null image of image guidance: black, same size as the input."""
    return Image.new("RGB", image.size)
