"""Reading the official TBAC-UniImage checkpoint format from a local folder.

A checkpoint folder holds ``config.json`` (``model_type`` ``tbacuniimage``) and either
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards listed by
``model.safetensors.index.json``. Keys are grouped by prefix:

* ``model.mllm_backbone.*``  Qwen2.5-VL (either transformers' <=4.51 or >=4.52 module names)
* ``model.connector.{0,2,3}.*``  Linear -> GELU -> Linear -> RMSNorm
* ``model.transformer.*``  SANA DiT (stored bfloat16)
* ``vae.*``  DC-AE

Only safetensors are ever read (no pickle): a folder holding ``.bin``/``.pt``/``.ckpt`` weights
is refused with a message that says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..io.jsonfile import read_json
from .safetensors_reader import (
    CAST_CHUNK_BYTES,
    READ_ERRORS,
    PinnedStager,
    SafetensorsFile,
)

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_TYPE = "tbacuniimage"

MLLM_PREFIX = "model.mllm_backbone."
CONNECTOR_PREFIX = "model.connector."
DIT_PREFIX = "model.transformer."
VAE_PREFIX = "vae."
COMPONENT_PREFIXES = {
    "mllm": MLLM_PREFIX,
    "connector": CONNECTOR_PREFIX,
    "dit": DIT_PREFIX,
    "vae": VAE_PREFIX,
}


def read_checkpoint_config(checkpoint_dir: str | os.PathLike) -> dict:
    """Read and check ``config.json`` of a checkpoint folder (parsed as data, never executed)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"Checkpoint folder not found: {checkpoint_dir}. Expected a folder holding config.json and "
            f"{SINGLE_FILE_NAME} (or sharded model-0000k-of-0000n.safetensors with {INDEX_NAME})."
        )
    config_path = checkpoint_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"No {CONFIG_NAME} in {checkpoint_dir}. A TBAC-UniImage checkpoint folder holds config.json "
            f"(model_type '{MODEL_TYPE}') next to its safetensors weights."
        )
    config = read_json(config_path, "checkpoint config", error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, found {type(config).__name__}.")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}; this loader reads TBAC-UniImage checkpoints "
            f"(model_type '{MODEL_TYPE}', e.g. TencentBAC/TBAC-UniImage-3B)."
        )
    return config


def find_weight_files(checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor key of the checkpoint to the safetensors file that holds it."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_NAME
    single_path = checkpoint_dir / SINGLE_FILE_NAME
    if index_path.is_file():
        return _keys_from_index(index_path)
    if single_path.is_file():
        return {key: single_path for key in _safetensors_keys(single_path)}
    pickles = sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{checkpoint_dir} holds only pickle-based weights ({', '.join(pickles)}). They can run code "
            f"when loaded and are refused; use the safetensors release ({SINGLE_FILE_NAME} or shards "
            f"with {INDEX_NAME})."
        )
    shards = sorted(p.name for p in checkpoint_dir.glob("model-*-of-*.safetensors"))
    if shards:
        raise CheckpointError(
            f"{checkpoint_dir} has shard files ({', '.join(shards)}) but no {INDEX_NAME}; copy the "
            f"index file from the release next to them."
        )
    raise CheckpointError(
        f"No weights in {checkpoint_dir}: expected {SINGLE_FILE_NAME} or {INDEX_NAME} with its shards."
    )


def _keys_from_index(index_path: Path) -> dict[str, Path]:
    index = read_json(index_path, "safetensors index", error=CheckpointError)
    try:
        weight_map = index["weight_map"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid safetensors index (no 'weight_map' object).") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} is not a valid safetensors index: 'weight_map' must map tensor "
                              f"names to shard file names.")
    shard_names = sorted(set(weight_map.values()))
    for name in shard_names:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index_path} names shard {name!r}; shards must be .safetensors files in the same folder."
            )
    missing = [name for name in shard_names if not (index_path.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"Missing shard file(s) in {index_path.parent}: {', '.join(missing)} "
            f"(listed by {INDEX_NAME}; {len(shard_names) - len(missing)} of {len(shard_names)} present). "
            f"The download is incomplete: fetch the missing files."
        )
    key_to_file: dict[str, Path] = {}
    for name in shard_names:
        path = index_path.parent / name
        listed = {key for key, shard in weight_map.items() if shard == name}
        present = set(_safetensors_keys(path))
        absent = sorted(listed - present)
        if absent:
            raise CheckpointError(
                f"{path} lacks {len(absent)} tensor(s) that {INDEX_NAME} puts there, e.g. "
                f"{', '.join(absent[:5])}. The shard is incomplete or from another release."
            )
        for key in listed:
            key_to_file[key] = path
    return key_to_file


# Kept as stored by ``load_component``: fp8 weights and their float32 per-tensor scales (tbac_core.quantization).
KEEP_STORED_DTYPE = (torch.float8_e4m3fn,)
SCALE_SUFFIX = ".scale_weight"


def iter_safetensors(path: Path, keys: list[str]):
    """Yield ``(key, tensor)`` for ``keys`` of one file, each read into its own CPU buffer (``readinto``).

    Peak memory: the tensors kept by the caller plus one (see ``safetensors_reader`` for why not a map).
    """
    with SafetensorsFile.open(path) as file:
        for key in keys:
            yield key, file.copied(key)  # the caller's work on it is outside the reader: not a read error


def _target_dtype(key: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``key`` is loaded in: ``dtype`` for floating tensors, but fp8 weights and scales as stored."""
    if dtype is None or not stored.is_floating_point or stored in KEEP_STORED_DTYPE or key.endswith(SCALE_SUFFIX):
        return stored
    return dtype


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except READ_ERRORS as exc:
        raise CheckpointError(
            f"Cannot read {path} as safetensors ({type(exc).__name__}: {exc}). The file is truncated or "
            f"corrupt: download it again."
        ) from exc


@dataclass
class CheckpointFiles:
    """The weight files of one checkpoint folder and which component each key belongs to."""

    directory: Path
    key_to_file: dict[str, Path]
    components: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def open(cls, checkpoint_dir: str | os.PathLike) -> CheckpointFiles:
        directory = Path(checkpoint_dir)
        key_to_file = find_weight_files(directory)
        components: dict[str, list[str]] = {name: [] for name in COMPONENT_PREFIXES}
        unexpected = []
        for key in key_to_file:
            for name, prefix in COMPONENT_PREFIXES.items():
                if key.startswith(prefix):
                    components[name].append(key)
                    break
            else:
                unexpected.append(key)
        if unexpected:
            raise CheckpointError(
                f"Unexpected tensor(s) in {directory}: {', '.join(sorted(unexpected)[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}. A TBAC-UniImage checkpoint only holds keys under "
                f"{', '.join(COMPONENT_PREFIXES.values())}."
            )
        empty = [name for name, keys in components.items() if not keys]
        if empty:
            raise CheckpointError(
                f"{directory} has no weights for: {', '.join(empty)} (no keys under "
                f"{', '.join(COMPONENT_PREFIXES[name] for name in empty)}). This is not a complete "
                f"TBAC-UniImage checkpoint."
            )
        return cls(directory, key_to_file, components)

    def describe(self) -> str:
        files = sorted({path.name for path in self.key_to_file.values()})
        return f"{self.directory} ({', '.join(files)})"

    def keys_by_file(self, component: str) -> dict[Path, list[str]]:
        """One component's keys grouped by shard, so each file is opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in self.components[component]:
            by_file.setdefault(self.key_to_file[key], []).append(key)
        return by_file

    def load_component(
        self,
        component: str,
        dtype: torch.dtype | None,
        device: torch.device | str = "cpu",
        *,
        zero_copy: bool = True,
        input_major: frozenset[str] = frozenset(),
        transform=None,
    ) -> dict[str, torch.Tensor]:
        """Read one component's tensors with the prefix stripped, cast to ``dtype`` on ``device``.

        How each tensor is read (``safetensors_reader`` explains the three ways):

        * on the CPU in its stored dtype (and ``zero_copy``): a view of the file's private memory
          map, no copy; writing into it never reaches the file (copy-on-write);
        * with a cast (bf16 -> fp32) off CUDA: read with ``readinto`` through one reused 16 MiB buffer
          into the cast tensor, one tensor at a time (peak: the loaded weights + the buffer);
        * in its stored dtype on another device (or ``zero_copy=False``): copied with ``readinto``;
        * on a CUDA device: streamed through two bounded pinned buffers and cast on the device.

        ``zero_copy=False`` copies every tensor: for callers that replace the tensors soon (quantising
        while loading), whose mapped pages would otherwise stay resident behind the others.
        ``input_major``: keys (prefix stripped) of weights [out, in, ...] to store with memory [in, out]
        on the CPU (``modeling.weight_layout``), read through the cast buffer and transposed on the way.
        ``transform(key, tensor) -> dict``: replaces each tensor as soon as it is read (quantising while
        loading), so the component is never held at full precision all at once.
        """
        prefix = COMPONENT_PREFIXES[component]
        device = torch.device(device)
        stager = PinnedStager(device) if device.type == "cuda" and torch.cuda.is_available() else None
        staging = None  # the CPU cast buffer, made at the first cast
        state: dict[str, torch.Tensor] = {}
        for path, keys in self.keys_by_file(component).items():
            # Read errors become a CheckpointError inside the reader; casting and moving (out of
            # memory, a device error) raise as what they are.
            with SafetensorsFile.open(path) as file:
                for key in keys:
                    stored = file.entry(key).dtype
                    target = _target_dtype(key, stored, dtype)
                    transposed = key[len(prefix):] in input_major
                    if stager is not None:
                        tensor = file.streamed(key, device, stager)
                    elif target != stored or transposed:
                        if staging is None:
                            staging = torch.empty(CAST_CHUNK_BYTES, dtype=torch.uint8)
                        tensor = file.cast(key, target, staging, input_major=transposed)
                    elif zero_copy and device.type == "cpu":
                        tensor = file.mapped(key)
                    else:
                        tensor = file.copied(key)
                    tensor = tensor.to(dtype=target).to(device)
                    local = key[len(prefix):]
                    state.update(transform(local, tensor) if transform is not None else {local: tensor})
        if stager is not None:
            stager.finish()
        return state

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (full key) in its stored dtype, read through the header."""
        with safe_open(str(self.key_to_file[key]), framework="pt", device="cpu") as handle:
            return handle.get_slice(key)[start:stop]

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Shapes of one component's tensors (prefix stripped), read from the headers only."""
        prefix = COMPONENT_PREFIXES[component]
        shapes = {}
        for path, keys in self.keys_by_file(component).items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in keys:
                    shapes[key[len(prefix):]] = tuple(handle.get_slice(key).get_shape())
        return shapes
