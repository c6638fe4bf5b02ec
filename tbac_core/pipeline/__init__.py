"""Running a loaded model: placement, sampling, the pipeline, and image understanding."""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".tbac_pipeline": ("TBACPipeline", "GenerationOutput", "CheckedInputs"),
    ".placement": ("Placement", "MemoryModePlacement", "PARTS"),
    ".sampling": ("StepInfo", "make_scheduler"),
    ".preview": ("LatentRGBProjection", "PreviewProjections", "predicted_clean"),
    ".masking": ("composite_pixels", "resize_mask"),
    ".understanding": ("PRESETS", "resolve_question", "answer", "answer_batch"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
