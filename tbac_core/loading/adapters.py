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
import math
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterError
from ..io.files import atomic_path, atomic_write_json
from ..io.jsonfile import read_json
from .weight_checks import nonfinite_tensors

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
MAX_LORA_RANK = 4096  # above the width of every TBAC DiT layer


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
    version = config.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise AdapterError(f"{path}: 'version' must be a whole number (1 for this format), got {version!r}.")
    if version > ADAPTER_VERSION:
        raise AdapterError(
            f"{path} has format version {version}; this tbac_core reads up to {ADAPTER_VERSION}. Update tbac_core."
        )
    for section in ("parts", "base"):
        if not isinstance(config.get(section), dict):
            raise AdapterError(f"{path}: {section!r} must be an object (as the trainer writes), got "
                               f"{type(config.get(section)).__name__}.")
    if config["parts"].get("dit") not in DIT_MODES:
        raise AdapterError(f"{path}: parts.dit must be one of {', '.join(DIT_MODES)}, "
                           f"got {config['parts'].get('dit')!r}.")
    if config["parts"]["dit"] == "lora":
        check_lora_config(config.get("lora"), str(folder))
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
@contextmanager
def restore_on_failure(tensors: list[torch.Tensor]):
    """All or nothing: snapshot ``tensors`` (copies on the CPU) and write them back if the block raises.

    Costs one CPU copy of exactly the tensors about to be written (views, such as embedding rows,
    are snapshotted as views: only their rows). An interrupt (``BaseException``) restores too.
    """
    saved = [tensor.detach().to("cpu", copy=True) for tensor in tensors]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved):
                tensor.copy_(copy.to(tensor.device))
        raise


def check_adapter_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every adapter tensor must be floating point and finite (a NaN adapter would damage every image)."""
    not_float = sorted(key for key, tensor in tensors.items() if not tensor.is_floating_point())
    if not_float:
        raise AdapterError(f"Adapter {where}: tensors {', '.join(not_float[:5])} are of dtype "
                           f"{tensors[not_float[0]].dtype}; trained parts are floating-point weights.")
    bad = nonfinite_tensors(tensors.items())
    if bad:
        raise AdapterError(
            f"Adapter {where}: the weights are not finite (NaN or inf) in {len(bad)} tensors: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. The training run diverged or the file is damaged; use an earlier "
            f"checkpoint of the run."
        )


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


def _assignments(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(existing parameter/buffer, new value) pairs; the values are cast when written."""
    current = module.state_dict(keep_vars=True)
    return [(current[key].data, tensor) for key, tensor in state.items()]


def check_lora_config(lora, where: str) -> dict:
    """The ``lora`` section of an adapter config: ``rank`` an integer >= 1, ``alpha`` a finite number."""
    if not isinstance(lora, dict):
        raise AdapterError(f"Adapter {where} declares LoRA on the DiT but its {ADAPTER_CONFIG} has no 'lora' section "
                           f"(a dict with rank and alpha, as the trainer writes).")
    rank, alpha, rslora = lora.get("rank"), lora.get("alpha"), lora.get("use_rslora", False)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_LORA_RANK:
        raise AdapterError(f"Adapter {where}: lora.rank must be an integer in 1..{MAX_LORA_RANK}, got {rank!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"Adapter {where}: lora.alpha must be a finite number, got {alpha!r}.")
    if not isinstance(rslora, bool):
        raise AdapterError(f"Adapter {where}: lora.use_rslora must be true or false, got {rslora!r}.")
    return lora


def lora_scale(lora: dict) -> float:
    rank, alpha = int(lora["rank"]), float(lora["alpha"])
    return alpha / rank**0.5 if lora.get("use_rslora") else alpha / rank


def lora_pairs(transformer: torch.nn.Module, state: dict[str, torch.Tensor], lora: dict,
               where: str) -> list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]:
    """Check peft LoRA matrices against the DiT -> (Linear, A [r, in], B [out, r]) per module; writes nothing."""
    modules = dict(transformer.named_modules())
    rank = check_lora_config(lora, where)["rank"]
    for key in state:
        if key.rpartition(".lora_")[2] not in ("A.weight", "B.weight"):
            raise AdapterError(f"Adapter {where}: LoRA key {key!r} is neither <module>.lora_A.weight nor "
                               f"<module>.lora_B.weight.")
    pairs = []
    for name in sorted({key.rsplit(".lora_", 1)[0] for key in state}):
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if a_key not in state or b_key not in state:
            raise AdapterError(f"Adapter {where} has an incomplete LoRA pair for DiT module {name!r} (needs both "
                               f"{a_key} and {b_key}).")
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise AdapterError(f"Adapter {where} has LoRA weights for {name!r}, which is not a Linear layer of "
                               f"the loaded DiT.")
        a, b = state[a_key], state[b_key]
        fits = (a.ndim == 2 and b.ndim == 2 and a.shape == (rank, target.in_features)
                and b.shape == (target.out_features, rank))
        if not fits:
            raise AdapterError(f"Adapter {where}: LoRA matrices for {name!r} have shapes {tuple(a.shape)} / "
                               f"{tuple(b.shape)}; its weight {tuple(target.weight.shape)} with rank {rank} needs "
                               f"{(rank, target.in_features)} / {(target.out_features, rank)}.")
        pairs.append((target, a, b))
    return pairs


def merge_lora(transformer: torch.nn.Module, state: dict[str, torch.Tensor], lora: dict, where: str) -> int:
    """Merge peft LoRA matrices (``<module>.lora_A.weight`` / ``lora_B.weight``) into Linear weights.

    Returns the number of merged modules. W [out, in] += scale * B [out, r] @ A [r, in], computed
    in float32 and cast to W's dtype. Every pair is checked before the first weight is changed, and
    a failure while merging restores every weight.
    """
    pairs = lora_pairs(transformer, state, lora, where)
    with restore_on_failure([target.weight.data for target, _, _ in pairs]):
        _add_lora(pairs, lora_scale(lora))
    return len(pairs)


@torch.no_grad()
def _add_lora(pairs: list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]], scale: float) -> None:
    for target, a, b in pairs:
        delta = (b.float() @ a.float()) * scale  # [out, in]
        target.weight.add_(delta.to(device=target.weight.device, dtype=target.weight.dtype))


def apply_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """Load a trained-parts folder on top of a loaded ``TBACModel``, in place, all or nothing.

    Everything is checked before anything changes (config, base, tensor names, shapes, dtypes,
    finiteness, LoRA pairs, rank and alpha), and a failure while writing (out of memory, an
    interrupt) restores every written tensor: a refused or failed adapter leaves the model bit for
    bit as it was, with its identity. On success the identity gets the adapter's name and a new
    fingerprint, so conditioning encoded before is refused afterwards (pipelines should be built,
    or their caches cleared, after applying).
    """
    folder = Path(adapter_dir)
    where = str(folder)
    config = read_adapter_config(folder)
    check_base(config, model, where)
    tensors = read_adapter_tensors(folder)
    check_adapter_tensors(tensors, where)
    parts = split_parts(tensors)
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
    pairs = lora_pairs(model.dit.transformer, parts["dit_lora"], config.get("lora"), where) if mode == "lora" else []
    digest = hashlib.sha256((model.identity.fingerprint + adapter_fingerprint(folder)).encode()).hexdigest()

    # Everything is checked: write. ``writes`` are (target, new value) copies; LoRA adds to its targets.
    writes = []
    if rows is not None:
        embedding = model.mllm.get_input_embeddings().weight.data
        writes.append((embedding[model.base_vocab: model.base_vocab + count], rows))
    writes += _assignments(model.dit.connector, parts["connector"])
    if mode == "full":
        writes += _assignments(model.dit.transformer, parts["dit"])
    targets = [target for target, _ in writes] + [linear.weight.data for linear, _, _ in pairs]
    with restore_on_failure(targets), torch.no_grad():
        for target, value in writes:
            target.copy_(value.to(dtype=target.dtype, device=target.device))
        if pairs:
            _add_lora(pairs, lora_scale(config["lora"]))
        overflowed = nonfinite_tensors((str(i), t) for i, t in enumerate(targets))
        if overflowed:  # e.g. a large LoRA delta added to float16 weights: restored on the way out
            raise AdapterError(f"Adapter {where}: applying it made {len(overflowed)} weights of the model infinite "
                               f"(overflow in {targets[0].dtype}); load the model in float32 or bfloat16.")
    model.identity = replace(model.identity, name=f"{model.identity.name}+{folder.name}", fingerprint=digest)


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
