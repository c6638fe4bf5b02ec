"""The built-in demo model: a TOY that shows the whole TBAC-UniImage pipeline work with no download.

Its world is 32x32 pictures of one coloured shape on a coloured background, captioned like
``a red circle on a blue background`` (colours: red, orange, yellow, green, blue, purple, white,
black; shapes: circle, square, triangle). It does the three jobs of TBAC-UniImage there: a tiny
Qwen2.5-VL, pretrained on these scenes and then frozen, answers questions about them ("What colour
is the background?", the "describe in detail" preset) and reads prompts and edit instructions
("make the circle green", "change the background to black"); a small ladder DiT, trained with the
project's own trainer, draws the result. It knows nothing else.

``DEMO_CHECKPOINT`` is an official-format checkpoint folder (config.json + model.safetensors, with
its component folders inside); rebuild it with ``python -m tbac_core.demo.build``.
"""
from __future__ import annotations

import json
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
DEMO_NAME = "demo"  # what the CLI, the loader node and load_model accept for the built-in model

# Sampling settings the demo was tuned with; the build stores them in config.json ("demo_defaults").
DEMO_DEFAULTS = {"steps": 20, "guidance_scale": 3.0, "sampler": "dpm++", "width": 32, "height": 32}


def demo_defaults(checkpoint_dir: str | Path = DEMO_CHECKPOINT) -> dict:
    """The sampling defaults stored in a demo checkpoint's config.json (``DEMO_DEFAULTS`` if absent)."""
    try:
        config = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(DEMO_DEFAULTS)
    return {**DEMO_DEFAULTS, **(config.get("demo_defaults") or {})}


__all__ = ["DEMO_CHECKPOINT", "DEMO_DEFAULTS", "demo_defaults"]
