"""Finding a checkpoint's component folders (MLLM, SANA) locally, never on the network.

``config.json`` names the components by id: hub ids in the real checkpoint
(``Qwen/Qwen2.5-VL-3B-Instruct``), relative paths in test fixtures. Only their small files are
read from those folders (configs, tokenizer, image-processor settings); the weights always come
from the TBAC checkpoint itself. When no folder is found the published architecture is used
(``builtin_configs``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, ComponentNotFoundError
from ..io.jsonfile import read_json
from . import builtin_configs

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "TBAC_MODELS_DIR"


@dataclass(frozen=True)
class TBACConfig:
    """The fields of a checkpoint's ``config.json`` that inference needs."""

    mllm_id: str
    diffusion_model_id: str
    vae_id: str
    scheduler_id: str
    num_metaqueries: int
    input_size: int
    in_channels: int
    vae_downsample_f: int
    max_input_text_tokens: int
    system_prompt: str | None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "TBACConfig":
        sana = builtin_configs.SANA_1600M_512_ID
        try:
            config = cls(
                mllm_id=str(raw.get("mllm_id", builtin_configs.QWEN25_VL_3B_ID)),
                diffusion_model_id=str(raw.get("diffusion_model_id", sana)),
                vae_id=str(raw.get("vae_id", sana)),
                scheduler_id=str(raw.get("scheduler_id", sana)),
                num_metaqueries=int(raw.get("num_metaqueries", 64)),
                input_size=int(raw.get("input_size", 16)),
                in_channels=int(raw.get("in_channels", 32)),
                vae_downsample_f=int(raw.get("vae_downsample_f", 32)),
                max_input_text_tokens=int(raw.get("max_input_text_tokens", 256)),
                system_prompt=raw.get("system_prompt"),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source} has a field of the wrong type: {exc}") from exc
        if config.num_metaqueries <= 0:
            raise CheckpointError(f"{source}: num_metaqueries must be > 0, got {config.num_metaqueries}.")
        return config

    @property
    def default_image_size(self) -> int:
        return self.input_size * self.vae_downsample_f


def search_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for component folders, besides the checkpoint's own folder and parent."""
    dirs = [Path(d) for d in (extra or [])]
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    return dirs


def _is_safe_relative_id(component_id: str) -> bool:
    parts = PurePosixPath(component_id.replace("\\", "/")).parts
    return bool(parts) and not PurePosixPath(component_id).is_absolute() and ".." not in parts


def resolve_component_dir(
    component_id: str,
    checkpoint_dir: Path,
    required_file: str,
    extra_dirs: list[Path] | None = None,
) -> Path | None:
    """Return a local folder for ``component_id`` holding ``required_file``, or None.

    Looks, in order: next to and inside the checkpoint folder, in the given model folders and
    ``$TBAC_MODELS_DIR``, then in the local Hugging Face cache (offline, ``local_files_only``).
    Ids that are absolute or contain ``..`` are not followed: a downloaded config must not make us
    read files outside the model folders.
    """
    if not _is_safe_relative_id(component_id):
        logger.warning("Ignoring component id %r: only relative ids without '..' are followed.", component_id)
        return None
    name = PurePosixPath(component_id).name
    bases = [checkpoint_dir.parent, checkpoint_dir, *(extra_dirs or [])]
    candidates = []
    for base in bases:
        candidates += [base / component_id, base / name]
    for candidate in candidates:
        if (candidate / required_file).is_file():
            return candidate
    return _from_hf_cache(component_id, required_file)


def _from_hf_cache(repo_id: str, required_file: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    found = try_to_load_from_cache(repo_id, required_file)
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found).parents[len(PurePosixPath(required_file).parts) - 1]
    return None


@dataclass(frozen=True)
class ComponentConfigs:
    """Architecture configs of every part, plus the folders they came from (None = built-in)."""

    mllm: dict
    transformer: dict
    vae: dict
    scheduler: dict
    mllm_dir: Path | None
    diffusion_dir: Path | None

    @classmethod
    def resolve(cls, config: TBACConfig, checkpoint_dir: Path, extra_dirs: list[Path] | None = None):
        mllm_dir = resolve_component_dir(config.mllm_id, checkpoint_dir, "config.json", extra_dirs)
        if mllm_dir is not None:
            mllm = read_json(mllm_dir / "config.json", "MLLM config", error=ComponentNotFoundError)
        else:
            mllm = _builtin(builtin_configs.BUILTIN_MLLM, config.mllm_id, "MLLM", checkpoint_dir, extra_dirs)
        parts = {}
        dirs = {}
        for part, component_id, file in (
            ("transformer", config.diffusion_model_id, "transformer/config.json"),
            ("vae", config.vae_id, "vae/config.json"),
            ("scheduler", config.scheduler_id, "scheduler/scheduler_config.json"),
        ):
            folder = resolve_component_dir(component_id, checkpoint_dir, file, extra_dirs)
            dirs[part] = folder
            if folder is not None:
                parts[part] = read_json(folder / file, f"{part} config", error=ComponentNotFoundError)
            else:
                table = builtin_configs.BUILTIN_DIFFUSION
                parts[part] = _builtin(table, component_id, part, checkpoint_dir, extra_dirs)[part]
        return cls(mllm, parts["transformer"], parts["vae"], parts["scheduler"], mllm_dir, dirs["transformer"])


def _builtin(table: dict, component_id: str, what: str, checkpoint_dir: Path, extra_dirs) -> dict:
    if component_id in table:
        return table[component_id]
    looked = [str(checkpoint_dir.parent), str(checkpoint_dir), *map(str, extra_dirs or [])]
    raise ComponentNotFoundError(
        f"No local folder found for the {what} component {component_id!r} (looked in {', '.join(looked)} "
        f"and the local Hugging Face cache) and there is no built-in config for it (built-in: "
        f"{', '.join(table)}). Place the component folder next to the checkpoint folder or in "
        f"${MODELS_DIR_ENV}."
    )
