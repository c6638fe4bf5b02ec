"""Building a ready-to-run ``TBACModel`` from a checkpoint folder in the official format.

Every module is built on the meta device from its config and receives the checkpoint's tensors
once, already in the target dtype and on the target device: nothing is initialised randomly,
no base Qwen/SANA weights are read first, nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import AutoTokenizer

from ..demo import DEMO_CHECKPOINT, DEMO_NAME
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ComponentNotFoundError
from ..io.jsonfile import read_json
from ..ladder.conditioning import ModelIdentity, fingerprint_tensor
from ..modeling.dit import Connector, LadderDiT
from ..modeling.meta_init import empty_weights
from ..modeling.mllm import (
    attach_lm_head,
    build_mllm,
    canonical_key,
    num_rungs,
    text_model,
)
from ..modeling.model import TBACModel
from ..modeling.vae import speed_up_vae
from ..modeling.weight_layout import input_major_keys
from ..processing.prompting import (
    TBAC_IMAGE_PIXELS,
    PromptBuilder,
    SpecialIds,
    make_image_processor,
)
from ..quantization.hook import load_component_state, open_checkpoint_files
from . import builtin_configs
from .checkpoint import CheckpointFiles, read_checkpoint_config
from .components import ComponentConfigs, TBACConfig, search_dirs

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
EMBED_KEY = "model.language_model.embed_tokens.weight"  # canonical layout
# SpecialIds field -> the MLLM config's key for the same token (Qwen2.5-VL's config.json).
MLLM_CONFIG_TOKEN_KEYS = {
    "image_pad": "image_token_id",
    "vision_start": "vision_start_token_id",
    "vision_end": "vision_end_token_id",
}



def load_model(
    checkpoint_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    vae_dtype: str | torch.dtype | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    models_dirs: list[str | os.PathLike] | None = None,
    name: str | None = None,
    quantization: str | None = None,
) -> TBACModel:
    """Load a TBAC-UniImage checkpoint folder into a ``TBACModel``.

    ``dtype``/``device``: "auto" picks the best available (see ``tbac_core.devices``).
    ``vae_dtype``: the DC-AE's dtype; by default the model's, but float32 when that is float16
    (DC-AE overflows in float16). ``tokenizer_dir``: a Qwen2.5 tokenizer folder to use instead of
    the one in the checkpoint or MLLM folder. ``models_dirs``: extra folders searched for the
    component folders (besides the checkpoint's parent and ``$TBAC_MODELS_DIR``). ``name``: the
    model's display name (default: the folder's name). ``quantization``: ``"fp8"``, ``"q8_0"``,
    ``"q5_k"`` or ``"q4_k"`` stores the linears of the MLLM's decoder layers and the DiT's blocks
    quantised, converted while loading; a folder written by ``quantize`` (fp8 safetensors or
    ``model.gguf``) is read as stored without it (see ``tbac_core.quantization``).

    Image-processor settings (``preprocessor_config.json``) are taken from the first of, in order:
    the user's ``tokenizer_dir``, the MLLM component folder, the checkpoint folder; without any,
    Qwen2.5-VL's published settings. A folder the user names explicitly wins over the ones we
    found ourselves.

    ``"demo"`` (when no folder of that name exists) is the built-in demo model, as in the CLI and
    the loader node.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if str(checkpoint_dir) == DEMO_NAME and not checkpoint_dir.exists():
        checkpoint_dir = DEMO_CHECKPOINT
    raw_config = read_checkpoint_config(checkpoint_dir)
    config = TBACConfig.from_dict(raw_config, str(checkpoint_dir / "config.json"))
    files = open_checkpoint_files(checkpoint_dir)  # safetensors, or model.gguf
    components = ComponentConfigs.resolve(config, checkpoint_dir, search_dirs(models_dirs))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if vae_dtype is None:
        # DC-AE overflows in float16 (black images); bfloat16 and float32 are safe.
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae_dtype = resolve_dtype(vae_dtype, device)

    user_tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
    tokenizer_path = find_tokenizer_dir([user_tokenizer_dir, checkpoint_dir, components.mllm_dir])
    tokenizer = load_tokenizer(tokenizer_path)
    processor_settings = image_processor_settings([user_tokenizer_dir, components.mllm_dir, checkpoint_dir])
    prompts = PromptBuilder(tokenizer, make_image_processor(processor_settings, _input_image_pixels(raw_config)),
                            config.max_input_text_tokens, processor_settings)

    # Cheap checks first (headers and configs), then the weights.
    mllm, base_vocab = _build_mllm(files, components.mllm, config)
    check_special_tokens(prompts.ids, components.mllm, tokenizer_path, components.mllm_dir)
    _load_mllm_weights(mllm, base_vocab, files, dtype, device, quantization)
    fingerprint = _metaquery_fingerprint(files, base_vocab, config.num_metaqueries)
    dit = _load_dit(files, components.transformer, mllm, dtype, device, quantization)
    vae = _load_vae(files, components.vae, vae_dtype, device)
    identity = ModelIdentity(
        name=name or checkpoint_dir.name,
        fingerprint=fingerprint,
        hidden_size=mllm.get_input_embeddings().weight.shape[1],
        num_rungs=num_rungs(mllm),
        num_metaqueries=config.num_metaqueries,
        num_dit_blocks=dit.num_blocks,
    )
    return TBACModel(config, checkpoint_dir, mllm, base_vocab, prompts, dit, vae, dict(components.scheduler),
                     identity)


# -- tokenizer and image processor ------------------------------------------------------------
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


def _input_image_pixels(raw_config: dict) -> int:
    """Pixels per input image of generation and editing: TBAC's 256 * 28 * 28 unless the checkpoint
    says otherwise (the 32x32 demo model: ``input_image_pixels`` 3136 = 56 * 56 px, 4 visual tokens)."""
    pixels = raw_config.get("input_image_pixels", TBAC_IMAGE_PIXELS)
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 3136 or pixels % 784:
        raise CheckpointError(f"config.json's input_image_pixels must be a multiple of 784 (28 * 28) and at least "
                              f"3136, got {pixels!r}.")
    return pixels


def load_tokenizer(folder: Path):
    """A Qwen2.5 tokenizer from ``folder``: its own tokenizer class, else Qwen2's on bare vocab files."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A bare vocab.json/merges.txt folder (as ComfyUI bundles it) names no tokenizer class.
        logger.debug("AutoTokenizer could not load %s (%s); trying Qwen2's tokenizer class", folder, exc)
        first_error = exc
    try:
        from transformers import Qwen2TokenizerFast as tokenizer_class
    except ImportError:
        from transformers import Qwen2Tokenizer as tokenizer_class
    try:
        return tokenizer_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ComponentNotFoundError(
            f"Cannot load a Qwen2.5 tokenizer from {folder}: {first_error}; as vocab.json + merges.txt: {exc}"
        ) from exc


# Whole-number settings of Qwen2.5-VL's image processor, with the ranges that make sense.
PROCESSOR_INT_FIELDS = {"min_pixels": (1, 2**31), "max_pixels": (1, 2**31), "patch_size": (1, 1024),
                        "merge_size": (1, 64), "temporal_patch_size": (1, 64)}
PROCESSOR_SIZE_FIELDS = ("shortest_edge", "longest_edge", "min_pixels", "max_pixels")


def image_processor_settings(folders: list[Path | None]) -> dict:
    """The first ``preprocessor_config.json`` among ``folders`` (in precedence order), else the built-in."""
    for folder in folders:
        if folder is not None and (folder / PREPROCESSOR_FILE).is_file():
            logger.info("Image-processor settings from %s", folder / PREPROCESSOR_FILE)
            settings = read_json(folder / PREPROCESSOR_FILE, "image processor config", error=ComponentNotFoundError)
            check_processor_settings(settings, folder / PREPROCESSOR_FILE)
            return settings
    logger.info("No %s found; using Qwen2.5-VL's published image-processor settings", PREPROCESSOR_FILE)
    return dict(builtin_configs.QWEN25_VL_IMAGE_PROCESSOR)


def check_processor_settings(settings, where: Path) -> None:
    """Refuse a preprocessor config whose pixel/patch settings are not whole numbers in range."""
    if not isinstance(settings, dict):
        raise CheckpointError(f"{where} must hold a JSON object of image-processor settings, "
                              f"got {type(settings).__name__}.")
    size = settings.get("size", {})
    if size is None:
        size = {}
    if not isinstance(size, dict):
        raise CheckpointError(f"{where}: 'size' must be an object (e.g. {{\"shortest_edge\": 3136}}), got {size!r:.60}.")
    fields = [(key, settings[key], PROCESSOR_INT_FIELDS[key]) for key in PROCESSOR_INT_FIELDS if settings.get(key) is not None]
    fields += [(f"size.{key}", size[key], (1, 2**31)) for key in PROCESSOR_SIZE_FIELDS if size.get(key) is not None]
    for name, value, (low, high) in fields:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{where}: {name} must be a whole number in {low}..{high}, got {value!r:.60}.")


def check_special_tokens(ids: SpecialIds, mllm_config: dict, tokenizer_dir: Path, mllm_dir: Path | None) -> None:
    """Refuse a tokenizer whose image/vision/chat token ids differ from the MLLM config's.

    A mismatched pair generates text-to-image silently and fails late and cryptically on the first
    image input ("Image features and image tokens do not match"); fail at load time instead.
    """
    config_file = mllm_dir / "config.json" if mllm_dir is not None else "the built-in Qwen2.5-VL-3B config"
    sections = [mllm_config, mllm_config.get("text_config") or {}]
    for field_name, key in MLLM_CONFIG_TOKEN_KEYS.items():
        configured = next((section[key] for section in sections if key in section), None)
        if configured is None:
            continue
        token_id = getattr(ids, field_name)
        if configured != token_id:
            raise CheckpointError(
                f"The tokenizer in {tokenizer_dir} gives {field_name} the id {token_id}, but the MLLM config "
                f"{config_file} says {key} = {configured}. The tokenizer and the MLLM config come from "
                f"different models: use the tokenizer of the checkpoint's MLLM (Qwen2.5-VL-3B-Instruct)."
            )


# -- weights ------------------------------------------------------------------------------------
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


def _build_mllm(files: CheckpointFiles, mllm_config: dict, config: TBACConfig):
    """The MLLM on the meta device, its embedding size checked against the checkpoint's header."""
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
    return model, base_vocab


def _load_mllm_weights(model, base_vocab: int, files: CheckpointFiles, dtype, device, quantization=None) -> None:
    state = load_component_state(files, "mllm", model, dtype, device, quantization, rename=canonical_key)
    load_strict(model, state, files.describe(), rename=canonical_key)
    attach_lm_head(model, base_vocab)
    model.to(device)


def _load_dit(files: CheckpointFiles, transformer_config: dict, mllm, dtype, device, quantization=None) -> LadderDiT:
    with empty_weights():
        transformer = SanaTransformer2DModel.from_config(transformer_config)
        connector = Connector(text_model(mllm).norm.weight.shape[0], transformer.config.caption_channels)
    # A float32 DiT on the CPU: linear weights stored input-major (weight_layout: faster products at
    # its small token counts).
    input_major = input_major_keys(transformer) if torch.device(device).type == "cpu" and dtype == torch.float32 \
        and not quantization else frozenset()
    load_strict(transformer, load_component_state(files, "dit", transformer, dtype, device, quantization,
                                                  input_major=input_major), files.describe())
    load_strict(connector, files.load_component("connector", dtype, device), files.describe())
    dit = LadderDiT(transformer, connector).to(device)
    return dit.eval().requires_grad_(False)


def _load_vae(files: CheckpointFiles, vae_config: dict, dtype, device) -> AutoencoderDC:
    with empty_weights():
        vae = AutoencoderDC.from_config(vae_config)
    load_strict(vae, files.load_component("vae", dtype, device), files.describe())
    speed_up_vae(vae)
    return vae.to(device).eval().requires_grad_(False)


def _metaquery_fingerprint(files: CheckpointFiles, base_vocab: int, num_metaqueries: int) -> str:
    """A hash of the checkpoint's metaquery rows: adapters and conditionings name their base by it."""
    key = next(k for k in files.components["mllm"] if canonical_key(k[len("model.mllm_backbone."):]) == EMBED_KEY)
    rows = files.read_rows(key, base_vocab, base_vocab + num_metaqueries)
    return fingerprint_tensor(rows)
