"""The saved-conditioning file format: ``save_conditioning`` and ``load_conditioning``.

``save_conditioning`` writes ``.safetensors``: tensors ``source.<i>.<branch>`` (and
``attention_mask``) plus, in the safetensors metadata, ``tbac_format`` / ``tbac_format_version``
and ``tbac_conditioning``: JSON with the model identity, each source's prompts, negative prompt
and input-image counts, the block recipes and the conditioning's info. Loading reads only
safetensors and JSON (no pickle), checks every field, and refuses files of another model.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import (
    ConditioningFileError,
    IncompatibleConditioningError,
    OutputExistsError,
)
from ..io.files import atomic_write
from ..io.jsonfile import parse_json
from .conditioning import (
    BRANCHES,
    BlockTerm,
    LadderConditioning,
    ModelIdentity,
    RungSource,
)

__all__ = [
    "FILE_EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ConditioningFileError",
    "load_conditioning",
    "save_conditioning",
]

FORMAT_NAME = "tbac-ladder-conditioning"
FORMAT_VERSION = 1
FILE_EXTENSION = ".safetensors"


def _json_safe(value):
    """``info`` values that JSON can hold exactly; anything else is stored as its str()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _document(cond: LadderConditioning) -> dict:
    return {
        "model": asdict(cond.model),
        "sources": [
            {
                "prompts": list(s.prompts),
                "negative_prompt": s.negative_prompt,
                "num_input_images": list(s.num_input_images),
                "image_guidance": s.image_negative is not None,
            }
            for s in cond.sources
        ],
        # JSON writes floats with repr(), which reads back to the same float: recipes round-trip exactly.
        "blocks": [[[t.source, t.rung, t.weight] for t in terms] for terms in cond.blocks],
        "attention_mask": cond.attention_mask is not None,
        "info": _json_safe(cond.info),
    }


def _tensors(cond: LadderConditioning) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, source in enumerate(cond.sources):
        for branch in BRANCHES:
            states = source.branch(branch)
            if states is not None:
                # clone: encode's branches are views of one tensor, and safetensors refuses shared memory.
                tensors[f"source.{index}.{branch}"] = states.detach().to("cpu").contiguous().clone()
    if cond.attention_mask is not None:
        tensors["attention_mask"] = cond.attention_mask.detach().to("cpu").contiguous().clone()
    return tensors


def save_conditioning(cond: LadderConditioning, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``cond`` to a ``.safetensors`` file atomically; returns the path written.

    The file appears complete or not at all (written to a temporary file in the same folder, then
    renamed). An existing file is kept and ``FileExistsError`` raised unless ``overwrite``.
    """
    from safetensors.torch import save

    cond.validate()
    path = Path(path)
    if path.suffix != FILE_EXTENSION:
        raise ConditioningFileError(f"A saved conditioning must end in {FILE_EXTENSION}, got {path.name!r}.")
    if path.exists() and not overwrite:
        raise _exists(path)
    metadata = {
        "tbac_format": FORMAT_NAME,
        "tbac_format_version": str(FORMAT_VERSION),
        "tbac_conditioning": json.dumps(_document(cond), allow_nan=False, ensure_ascii=False),
    }
    data = save(_tensors(cond), metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        atomic_write(path, data)
    else:
        _write_new_file(path, data)
    return path


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(path)


def _write_new_file(path: Path, data: bytes) -> None:
    """``atomic_write`` that never replaces an existing file.

    ``atomic_write`` renames over whatever is at ``path``, so the file is written complete under a
    hidden name first and then hard-linked into place: a link fails if ``path`` exists, even when
    another writer created it a moment ago.
    """
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    atomic_write(staged, data)
    try:
        os.link(staged, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:  # file systems without hard links: check, then rename (a small race remains)
        if path.exists():
            raise _exists(path) from None
        os.replace(staged, path)
    finally:
        if staged.exists():
            staged.unlink()


def _field(document: dict, key: str, kind, where: str):
    if not isinstance(document, dict) or key not in document:
        raise ValueError(f"{where} lacks {key!r}")
    value = document[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"{where}.{key} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _parse_identity(document: dict) -> ModelIdentity:
    model = _field(document, "model", dict, "metadata")
    values = {}
    for item in fields(ModelIdentity):
        kind = int if item.type in ("int", int) else str
        values[item.name] = _field(model, item.name, kind, "model")
    return ModelIdentity(**values)


def _parse_blocks(document: dict) -> tuple:
    blocks = []
    for index, terms in enumerate(_field(document, "blocks", list, "metadata")):
        if not isinstance(terms, list):
            raise ValueError(f"block {index} is not a list of terms")
        parsed = []
        for term in terms:
            if (not isinstance(term, list) or len(term) != 3 or any(isinstance(v, bool) for v in term)
                    or not isinstance(term[0], int) or not isinstance(term[1], int)
                    or not isinstance(term[2], (int, float)) or not math.isfinite(term[2])):
                raise ValueError(f"block {index} has a malformed term {term!r} (expected [source, rung, weight])")
            parsed.append(BlockTerm(term[0], term[1], float(term[2])))
        blocks.append(tuple(parsed))
    return tuple(blocks)


def _check_states(name: str, states: torch.Tensor, identity: ModelIdentity) -> None:
    if states.ndim != 4 or states.shape[2] != identity.num_metaqueries or states.shape[3] != identity.hidden_size:
        raise ValueError(
            f"tensor {name!r} has shape {list(states.shape)}; expected [rungs, batch, "
            f"{identity.num_metaqueries}, {identity.hidden_size}] for this model"
        )
    if not 1 <= states.shape[0] <= identity.num_rungs or states.shape[1] < 1:
        raise ValueError(f"tensor {name!r} has {states.shape[0]} rungs and batch {states.shape[1]}")
    if not states.is_floating_point():
        raise ValueError(f"tensor {name!r} holds {states.dtype}, not floating-point states")
    if not torch.isfinite(states).all():
        raise ValueError(f"tensor {name!r} holds NaN or infinite values")


def _parse_sources(document: dict, tensors: dict, identity: ModelIdentity) -> tuple[RungSource, ...]:
    sources = []
    entries = _field(document, "sources", list, "metadata")
    if not entries:
        raise ValueError("it has no sources")
    for index, entry in enumerate(entries):
        where = f"sources[{index}]"
        prompts = _field(entry, "prompts", list, where)
        counts = _field(entry, "num_input_images", list, where)
        if not all(isinstance(p, str) for p in prompts) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ValueError(f"{where} has malformed prompts or image counts")
        branches = {}
        for branch in BRANCHES:
            name = f"source.{index}.{branch}"
            if branch == "image_negative" and not _field(entry, "image_guidance", bool, where):
                continue
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is missing")
            _check_states(name, tensors[name], identity)
            branches[branch] = tensors[name]
        positive = branches["positive"]
        for branch, states in branches.items():
            if states.shape[0] != positive.shape[0] or states.shape[1] not in (1, positive.shape[1]):
                raise ValueError(f"tensor 'source.{index}.{branch}' does not match the positive branch's shape")
        if len(prompts) != positive.shape[1]:
            raise ValueError(f"{where} names {len(prompts)} prompts but holds a batch of {positive.shape[1]}")
        sources.append(RungSource(
            positive=positive,
            negative=branches["negative"],
            image_negative=branches.get("image_negative"),
            prompts=tuple(prompts),
            negative_prompt=_field(entry, "negative_prompt", str, where),
            num_input_images=tuple(counts),
        ))
    return tuple(sources)


def load_conditioning(path: str | os.PathLike, expected: ModelIdentity | None = None) -> LadderConditioning:
    """Read a conditioning written by ``save_conditioning`` (safetensors + JSON, nothing executable).

    ``expected``: the identity of the model it will be used with; a file made by another model is
    refused with ``IncompatibleConditioningError``. Missing, malformed or corrupt files raise
    ``ConditioningFileError`` saying what is wrong. Tensors come back on the CPU in their saved dtype.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConditioningFileError(f"No saved conditioning at {path}: the file does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ConditioningFileError(
            f"{path} is not a readable .safetensors file (corrupt, truncated or another format): {exc}"
        ) from exc
    if metadata.get("tbac_format") != FORMAT_NAME:
        raise ConditioningFileError(
            f"{path} is a safetensors file but not a saved TBAC ladder conditioning (no "
            f"tbac_format={FORMAT_NAME!r} in its metadata); it may be a model checkpoint or another tool's file."
        )
    version = metadata.get("tbac_format_version")
    if version != str(FORMAT_VERSION):
        raise ConditioningFileError(
            f"{path} uses conditioning file format version {version!r}; this version of the pack reads "
            f"version {FORMAT_VERSION}. Update the pack (or re-save it with this version)."
        )
    document = parse_json(metadata.get("tbac_conditioning", ""), f"{path} has malformed conditioning metadata",
                          error=ConditioningFileError)  # bounded depth: never a RecursionError
    try:
        identity = _parse_identity(document)
    except (ValueError, TypeError) as exc:
        raise ConditioningFileError(f"{path} has malformed conditioning metadata: {exc}.") from exc
    if expected is not None:
        try:
            expected.check_compatible(identity, what=f"saved conditioning ({path.name})")
        except IncompatibleConditioningError as exc:
            raise IncompatibleConditioningError(f"{exc} (file: {path})") from None
    try:
        sources = _parse_sources(document, tensors, identity)
        blocks = _parse_blocks(document)
        mask = None
        if _field(document, "attention_mask", bool, "metadata"):
            if "attention_mask" not in tensors:
                raise ValueError("tensor 'attention_mask' is missing")
            mask = tensors["attention_mask"]
        expected_keys = {f"source.{i}.{b}" for i, s in enumerate(sources) for b in BRANCHES if s.branch(b) is not None}
        extra = set(tensors) - expected_keys - ({"attention_mask"} if mask is not None else set())
        if extra:
            raise ValueError(f"it holds unexpected tensors {sorted(extra)}")
        info = document.get("info", {})
        cond = LadderConditioning(sources, blocks, identity, attention_mask=mask,
                                  info=info if isinstance(info, dict) else {})
        cond.validate()
    except (ValueError, TypeError, IncompatibleConditioningError) as exc:
        raise ConditioningFileError(f"{path} is not a valid saved conditioning: {exc}.") from exc
    return cond
