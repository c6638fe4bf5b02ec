"""Generation parameters stored inside PNG files, so every output says how to make it again.

Two text chunks are written:

* ``tbac_parameters``: JSON, the machine-readable record (prompt, negative prompt, seed, steps,
  guidance, size, sampler, layer spec and the block rungs it resolved to, images per prompt and
  this image's index in the batch, input images by name + SHA-256, the model's name and identity
  fingerprint, the tbac_core version). :func:`read_parameters` returns it as a dict.
* ``parameters``: one human-readable A1111-style text (prompt, ``Negative prompt: ...``, then
  ``Key: value, ...``), which image viewers and other tools already show.

Pure PIL + json; no torch.
"""
from __future__ import annotations

import io
import json
import os

from PIL import Image, PngImagePlugin

from ..errors import PNGMetadataError
from .jsonfile import parse_json

PARAMETERS_KEY = "tbac_parameters"
INFOTEXT_KEY = "parameters"
SCHEMA = 1

# A1111 labels for the line after the prompts, in order; values that are None are left out.
_INFOTEXT_FIELDS = (
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("CFG scale", "guidance"),
    ("Image CFG scale", "image_guidance"),
    ("Seed", "seed"),
    ("Size", None),  # width x height
    ("Model", None),  # model name
    ("Model hash", None),  # identity fingerprint, shortened like A1111's hashes
    ("Denoising strength", "denoise"),
    ("Layers", "layers"),
    ("Batch size", "num_images"),
    ("Batch pos", "image_index"),
    ("Version", None),
)


def format_infotext(parameters: dict) -> str:
    """The A1111-style ``parameters`` text of a parameter record."""
    model = parameters.get("model") or {}
    special = {
        "Size": f"{parameters.get('width')}x{parameters.get('height')}",
        "Model": model.get("name"),
        "Model hash": (model.get("fingerprint") or "")[:10] or None,
        "Version": f"tbac_core {parameters.get('tbac_core_version')}",
    }
    items = []
    for label, key in _INFOTEXT_FIELDS:
        value = special[label] if key is None else parameters.get(key)
        if value is not None:
            items.append(f"{label}: {_quote(value)}")
    lines = [parameters.get("prompt") or ""]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    lines.append(", ".join(items))
    return "\n".join(lines)


def _quote(value) -> str:
    """Quote values that would break the ``Key: value, ...`` line (A1111 does the same)."""
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def png_info(parameters: dict) -> PngImagePlugin.PngInfo:
    """Both text chunks for ``parameters`` (a JSON-serialisable dict)."""
    info = PngImagePlugin.PngInfo()
    record = {"schema": SCHEMA, **parameters}
    # ensure_ascii keeps the JSON chunk plain tEXt; the readable chunk becomes iTXt when needed.
    info.add_text(PARAMETERS_KEY, json.dumps(record, sort_keys=True, ensure_ascii=True))
    info.add_text(INFOTEXT_KEY, format_infotext(record))
    return info


def encode_png(image: Image.Image, parameters: dict) -> bytes:
    """The PNG file bytes of ``image`` with ``parameters`` embedded (pixels stored losslessly)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return buffer.getvalue()


def read_parameters(path: str | os.PathLike) -> dict:
    """The ``tbac_parameters`` record of a PNG written by :func:`encode_png`."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise PNGMetadataError(f"{path} is a {image.format} file, not a PNG written by tbac_core.")
            text = dict(getattr(image, "text", {}))
    except (OSError, SyntaxError) as exc:
        raise PNGMetadataError(f"Cannot read {path} as a PNG: {exc}") from exc
    if PARAMETERS_KEY not in text:
        found = ", ".join(sorted(text)) or "none"
        raise PNGMetadataError(
            f"{path} has no {PARAMETERS_KEY!r} text chunk (text chunks found: {found}); only PNGs saved by "
            f"tbac_core carry their generation parameters."
        )
    record = parse_json(text[PARAMETERS_KEY], f"The {PARAMETERS_KEY!r} chunk of {path}", error=PNGMetadataError)
    if not isinstance(record, dict):
        raise PNGMetadataError(f"The {PARAMETERS_KEY!r} chunk of {path} is not a JSON object.")
    record.pop("schema", None)
    return record
