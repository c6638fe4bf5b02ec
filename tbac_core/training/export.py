"""Writing a complete checkpoint in the official TBAC-UniImage format.

``config.json`` (``model_type`` tbacuniimage) + ``model.safetensors`` with the official key
prefixes (``model.mllm_backbone.`` in transformers' <=4.51 layout, as the released checkpoints,
``model.connector.``, ``model.transformer.``, ``vae.``), so the result loads here and in the
official code. Used to bake a trained adapter into a standalone model and to build the demo.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InvalidParameterError
from ..io.files import atomic_path, atomic_write_json
from ..loading.checkpoint import (
    CONFIG_NAME,
    CONNECTOR_PREFIX,
    DIT_PREFIX,
    MLLM_PREFIX,
    MODEL_TYPE,
    SINGLE_FILE_NAME,
    VAE_PREFIX,
)
from ..modeling.mllm import canonical_key


def legacy_mllm_key(key: str) -> str:
    """A Qwen2.5-VL key of either layout -> the <=4.51 layout the released checkpoints use."""
    key = canonical_key(key)
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def checkpoint_tensors(mllm_state: dict, connector_state: dict, dit_state: dict, vae_state: dict,
                       dit_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Prefix each part's state dict as the official checkpoint does (LM head left out: TBAC has none)."""
    tensors = {}
    for key, value in mllm_state.items():
        if not key.startswith("lm_head."):
            tensors[MLLM_PREFIX + legacy_mllm_key(key)] = value
    tensors.update({CONNECTOR_PREFIX + k: v for k, v in connector_state.items()})
    tensors.update({DIT_PREFIX + k: (v.to(dit_dtype) if dit_dtype and v.is_floating_point() else v)
                    for k, v in dit_state.items()})
    tensors.update({VAE_PREFIX + k: v for k, v in vae_state.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}


def write_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "model_type": MODEL_TYPE}
    with atomic_path(folder / SINGLE_FILE_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_NAME, config)
    return folder


def export_checkpoint(model, folder: str | os.PathLike, *, config_updates: dict | None = None,
                      dit_dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a ``TBACModel``, adapters already applied) as a standalone checkpoint.

    The config is the base checkpoint's ``config.json`` plus ``config_updates``; its component ids
    are kept, so the component folders must be reachable from ``folder`` as they were from the
    base (or pass updated ids). ``dit_dtype``: e.g. torch.bfloat16 as the official release.
    """
    injected = [name for name, _ in model.dit.transformer.named_modules() if name.endswith(".lora_A")]
    if injected:
        raise InvalidParameterError(
            "The model still holds training-time LoRA layers; apply the trained adapter to a freshly loaded base "
            "(tbac_core.loading.adapters.apply_adapter) and export that."
        )
    base_dir = Path(model.checkpoint_dir)
    base_config = json.loads((base_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    config = {**base_config, **(config_updates or {})}
    tensors = checkpoint_tensors(model.mllm.state_dict(), model.dit.connector.state_dict(),
                                 model.dit.transformer.state_dict(), model.vae.state_dict(), dit_dtype)
    out = write_checkpoint(folder, tensors, config)
    copy_embedded_components(base_dir, out, config)
    return out


def copy_embedded_components(base_dir: Path, out_dir: Path, config: dict) -> list[str]:
    """Copy component folders that live INSIDE the base checkpoint folder (as in the demo model).

    Only their small files (configs, tokenizer) are copied: a TBAC checkpoint keeps every weight in
    its own model.safetensors. Components found elsewhere (hub ids, model folders) are not copied.
    """
    copied = []
    for key in ("mllm_id", "diffusion_model_id", "vae_id", "scheduler_id"):
        component = config.get(key)
        if not isinstance(component, str) or component in copied:
            continue
        source = base_dir / component
        if not source.is_dir() or Path(component).is_absolute() or ".." in Path(component).parts:
            continue
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix not in (".safetensors", ".bin") and path.stat().st_size < 50_000_000:
                target = out_dir / component / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        copied.append(component)
    return copied
