"""tbac_core: TBAC-UniImage (arXiv 2508.08098) inference, understanding and training, without ComfyUI.

The import is light: torch, transformers and diffusers load when a model is first used.

    from tbac_core import TBACPipeline
    pipe = TBACPipeline.from_pretrained("models/tbac/TBAC-UniImage-3B")
"""
from __future__ import annotations

from ._exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {  # module -> the names it exports
    ".modeling.model": ("TBACModel",),
    ".loading.build": ("load_model",),
    ".pipeline.tbac_pipeline": ("TBACPipeline", "GenerationOutput"),
    ".ladder.conditioning": ("LadderConditioning",),
    ".params": ("SamplingParams", "GenerationSettings"),
    ".errors": ("TBACError",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
