"""Running a loaded model: placement, sampling, the pipeline, and image understanding."""
from .._exports import lazy_exports

_EXPORTS = {
    "TBACPipeline": ".tbac_pipeline",
    "GenerationOutput": ".tbac_pipeline",
    "Placement": ".placement",
    "MemoryModePlacement": ".placement",
    "PARTS": ".placement",
    "StepInfo": ".sampling",
    "make_scheduler": ".sampling",
    "LatentRGBProjection": ".preview",
    "PreviewProjections": ".preview",
    "predicted_clean": ".preview",
    "composite_pixels": ".masking",
    "resize_mask": ".masking",
    "PRESETS": ".understanding",
    "resolve_question": ".understanding",
    "answer": ".understanding",
    "answer_batch": ".understanding",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
