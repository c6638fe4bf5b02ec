"""tbac_core: TBAC-UniImage (arXiv 2508.08098) inference, understanding and training, without ComfyUI.

The import is light: torch, transformers and diffusers load when a model is first used.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "TBACModel": ".modeling.model",
    "TBACPipeline": ".pipeline.tbac_pipeline",
    "GenerationOutput": ".pipeline.tbac_pipeline",
    "LadderConditioning": ".ladder.conditioning",
    "SamplingParams": ".pipeline.sampling",
    "TBACError": ".errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'tbac_core' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
