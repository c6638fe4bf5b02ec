"""Trained-parts checkpoints ("adapters"): what ladder-side tuning changed, applied on a base model.

TBAC-UniImage's training recipe leaves the MLLM frozen and trains only the metaquery embedding
rows, the connector and the DiT (fully, or LoRA adapters on its attention). The trainer
(``tbac_core.training``) saves just those parts in a folder::

    my-adapter/
      adapter_config.json        what was trained, on which base model, how (JSON)
      adapter_model.safetensors  the tensors, by part:
                                   metaqueries.rows   [N, hidden]  the trained embedding rows
                                   connector.<key>    full connector weights
                                   dit.<key>          full DiT weights             (dit "full")
                                   dit_lora.<key>     peft LoRA A/B matrices        (dit "lora")

``apply_adapter(model, folder)`` loads such a folder on top of a loaded ``TBACModel`` in place.
LoRA matrices are merged into the DiT's linear weights (W += scale * B @ A), so inference runs
at full speed and does not need peft. An adapter records the identity of the base model it was
trained on (the fingerprint of the base's metaquery rows, sizes) and is refused on any other
model, or on a model that already has an adapter applied.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterError
from ..io.files import atomic_path, atomic_write_json
from ..io.jsonfile import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "tbac-trained-parts"
ADAPTER_VERSION = 1
MAX_DEPTH = 3  # how deep under a folder adapters are listed

METAQUERY_KEY = "metaqueries.rows"
CONNECTOR_PREFIX = "connector."
DIT_PREFIX = "dit."
LORA_PREFIX = "dit_lora."
DIT_MODES = ("full", "lora", "frozen")


# -- identity of the base ---------------------------------------------------------------------
def base_record(model) -> dict:
    """What an adapter must match: the base's fingerprint and every size the parts depend on."""
    identity = model.identity
    transformer = model.dit.transformer.config
    return {
        "name": identity.name.split("+", 1)[0],
        "fingerprint": identity.fingerprint,
        "hidden_size": identity.hidden_size,
        "num_rungs": identity.num_rungs,
        "num_metaqueries": identity.num_metaqueries,
        "num_dit_blocks": identity.num_dit_blocks,
        "base_vocab": int(model.base_vocab),
        "caption_channels": int(transformer.caption_channels),
        "dit_inner_dim": int(transformer.num_attention_heads * transformer.attention_head_dim),
        "latent_channels": int(transformer.in_channels),
    }


def check_base(config: dict, model, where: str) -> None:
    """Refuse ``config`` (an adapter_config.json) unless it was trained on ``model``'s base."""
    check_base_record(config.get("base") or {}, base_record(model), model.identity.name, where)


def check_base_record(expected: dict, actual: dict, model_name: str, where: str) -> None:
    sizes = [k for k in actual if k not in ("name", "fingerprint") and expected.get(k) != actual[k]]
    if sizes:
        diffs = ", ".join(f"{k} {expected.get(k)} vs {actual[k]}" for k in sizes)
        raise AdapterError(
            f"The adapter {where} was trained on a different model architecture ({diffs}; adapter vs loaded "
            f"model {model_name!r}). Load the base checkpoint {expected.get('name')!r} it was made for."
        )
    if expected.get("fingerprint") != actual["fingerprint"]:
        applied = "+" in model_name
        hint = (" The loaded model already has an adapter applied; reload the base checkpoint before applying "
                "another one." if applied else "")
        raise AdapterError(
            f"The adapter {where} was trained on base model {expected.get('name')!r} (fingerprint "
            f"{str(expected.get('fingerprint'))[:12]}), but the loaded model {model_name!r} has fingerprint "
            f"{actual['fingerprint'][:12]}: same sizes, different weights.{hint} Load the matching base checkpoint."
        )


# -- reading and writing ----------------------------------------------------------------------
def read_adapter_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"No {ADAPTER_CONFIG} in {folder}: not a TBAC trained-parts folder (expected {ADAPTER_CONFIG} + "
            f"{ADAPTER_WEIGHTS}, as written by 'python -m tbac_core train')."
        )
    config = read_json(path, "adapter config", error=AdapterError)
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path} is not a TBAC trained-parts config (format {ADAPTER_FORMAT!r} expected).")
    if int(config.get("version", 0)) > ADAPTER_VERSION:
        raise AdapterError(
            f"{path} has format version {config.get('version')}; this tbac_core reads up to {ADAPTER_VERSION}. "
            f"Update tbac_core."
        )
    if config.get("parts", {}).get("dit") not in DIT_MODES:
        raise AdapterError(f"{path}: parts.dit must be one of {', '.join(DIT_MODES)}.")
    return config


def read_adapter_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"No {ADAPTER_WEIGHTS} in {folder}; the adapter folder is incomplete.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:  # a damaged file, not an out-of-memory
        raise AdapterError(f"Cannot read {path} as safetensors ({type(exc).__name__}: {exc}).") from exc


def write_adapter(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write both files atomically, so a crash never leaves half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **config}
    with atomic_path(folder / ADAPTER_WEIGHTS) as weights_tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(weights_tmp),
                  metadata={"format": ADAPTER_FORMAT})
    atomic_write_json(folder / ADAPTER_CONFIG, config)


def split_parts(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"metaqueries": {}, "connector": {}, "dit": {}, "dit_lora": {}}
    for key, tensor in tensors.items():
        if key == METAQUERY_KEY:
            parts["metaqueries"][key] = tensor
        elif key.startswith(CONNECTOR_PREFIX):
            parts["connector"][key[len(CONNECTOR_PREFIX):]] = tensor
        elif key.startswith(LORA_PREFIX):
            parts["dit_lora"][key[len(LORA_PREFIX):]] = tensor
        elif key.startswith(DIT_PREFIX):
            parts["dit"][key[len(DIT_PREFIX):]] = tensor
        else:
            raise AdapterError(f"Unexpected tensor {key!r} in an adapter; known prefixes: metaqueries., "
                               f"{CONNECTOR_PREFIX}, {DIT_PREFIX}, {LORA_PREFIX}.")
    return parts


# -- applying ---------------------------------------------------------------------------------
def _check_shapes(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, where: str,
                  require_all: bool) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state)) if require_all else []
    shaped = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if unknown or missing or shaped:
        lines = [f"The {what} weights of adapter {where} do not fit the loaded model:"]
        for label, keys in (("unknown", unknown), ("missing", missing), ("mis-shaped", shaped)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise AdapterError("\n".join(lines))


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into existing parameters/buffers, keeping their dtype and device."""
    current = module.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            current[key].copy_(tensor.to(dtype=current[key].dtype, device=current[key].device))


def lora_scale(lora: dict) -> float:
    rank, alpha = int(lora["rank"]), float(lora["alpha"])
    return alpha / rank**0.5 if lora.get("use_rslora") else alpha / rank


def merge_lora(transformer: torch.nn.Module, state: dict[str, torch.Tensor], lora: dict, where: str) -> int:
    """Merge peft LoRA matrices (``<module>.lora_A.weight`` / ``lora_B.weight``) into Linear weights.

    Returns the number of merged modules. W [out, in] += scale * B [out, r] @ A [r, in], computed
    in float32 and cast to W's dtype.
    """
    modules = dict(transformer.named_modules())
    scale = lora_scale(lora)
    names = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    for name in names:
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if a_key not in state or b_key not in state:
            raise AdapterError(f"Adapter {where} has an incomplete LoRA pair for DiT module {name!r}.")
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise AdapterError(f"Adapter {where} has LoRA weights for {name!r}, which is not a Linear layer of "
                               f"the loaded DiT.")
        a, b = state[a_key].float(), state[b_key].float()
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise AdapterError(f"Adapter {where}: LoRA matrices for {name!r} have shapes {tuple(a.shape)} / "
                               f"{tuple(b.shape)}, which do not fit its weight {tuple(target.weight.shape)}.")
        with torch.no_grad():
            delta = (b @ a) * scale
            target.weight.add_(delta.to(device=target.weight.device, dtype=target.weight.dtype))
    return len(names)


def apply_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """Load a trained-parts folder on top of a loaded ``TBACModel``, in place.

    Checks everything before changing anything: a refused adapter leaves the model untouched. The
    model's identity gets the adapter's name and a new fingerprint, so conditioning encoded before
    is refused afterwards (pipelines should be built, or their caches cleared, after applying).
    """
    folder = Path(adapter_dir)
    where = str(folder)
    config = read_adapter_config(folder)
    check_base(config, model, where)
    parts = split_parts(read_adapter_tensors(folder))
    mode = config["parts"]["dit"]

    rows = parts["metaqueries"].get(METAQUERY_KEY)
    count, hidden = model.config.num_metaqueries, model.identity.hidden_size
    if rows is not None and tuple(rows.shape) != (count, hidden):
        raise AdapterError(f"Adapter {where}: metaquery rows have shape {tuple(rows.shape)}; the model needs "
                           f"({count}, {hidden}).")
    if parts["connector"]:
        _check_shapes(model.dit.connector, parts["connector"], "connector", where, require_all=True)
    if mode == "full":
        _check_shapes(model.dit.transformer, parts["dit"], "DiT", where, require_all=True)
    elif parts["dit"]:
        raise AdapterError(f"Adapter {where} holds full DiT weights but declares parts.dit = {mode!r}.")
    if mode == "lora" and not parts["dit_lora"]:
        raise AdapterError(f"Adapter {where} declares LoRA on the DiT but holds no LoRA weights.")
    if mode != "lora" and parts["dit_lora"]:
        raise AdapterError(f"Adapter {where} holds LoRA weights but declares parts.dit = {mode!r}.")
    if mode == "lora":
        _check_lora(model.dit.transformer, parts["dit_lora"], where)

    if rows is not None:
        embedding = model.mllm.get_input_embeddings().weight
        with torch.no_grad():
            start = model.base_vocab
            embedding[start: start + count].copy_(rows.to(dtype=embedding.dtype, device=embedding.device))
    if parts["connector"]:
        _assign(model.dit.connector, parts["connector"])
    if mode == "full":
        _assign(model.dit.transformer, parts["dit"])
    elif mode == "lora":
        merge_lora(model.dit.transformer, parts["dit_lora"], config["lora"], where)

    digest = hashlib.sha256((model.identity.fingerprint + adapter_fingerprint(folder)).encode()).hexdigest()
    model.identity = replace(model.identity, name=f"{model.identity.name}+{folder.name}", fingerprint=digest)


def _check_lora(transformer: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    modules = dict(transformer.named_modules())
    for key, tensor in state.items():
        name, _, kind = key.rpartition(".lora_")
        target = modules.get(name)
        if kind not in ("A.weight", "B.weight") or not isinstance(target, torch.nn.Linear):
            raise AdapterError(f"Adapter {where}: LoRA key {key!r} does not name a Linear layer of the loaded DiT.")
        fits = tensor.shape[1] == target.in_features if kind == "A.weight" else tensor.shape[0] == target.out_features
        if tensor.ndim != 2 or not fits:
            raise AdapterError(f"Adapter {where}: LoRA matrix {key!r} of shape {tuple(tensor.shape)} does not fit "
                               f"{name!r} ({target.in_features} -> {target.out_features}).")


def adapter_fingerprint(folder: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(Path(folder) / ADAPTER_WEIGHTS, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- finding ----------------------------------------------------------------------------------
def is_adapter_dir(folder: Path) -> bool:
    config = folder / ADAPTER_CONFIG
    if not config.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        data = read_json(config, "adapter config", error=AdapterError)
    except AdapterError:  # unreadable, huge or deeply nested: not an adapter we can list
        return False
    return isinstance(data, dict) and data.get("format") == ADAPTER_FORMAT


def list_adapters(folder: str | os.PathLike) -> list[str]:
    """Adapter folders under ``folder`` (up to 3 levels deep) as sorted '/'-separated relative names.

    Training output folders list their checkpoints too (``run/checkpoint-000500``, ``run/final``).
    A missing folder lists nothing.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if depth > 0 and is_adapter_dir(here):
            found.append(here.relative_to(root).as_posix())
            dirnames.clear()
        elif depth >= MAX_DEPTH:
            dirnames.clear()
        dirnames.sort()
    return sorted(found)
