"""Running a loaded model: placement, sampling, the pipeline, and image understanding."""
from .._exports import lazy_exports

_EXPORTS = {
    "TBACPipeline": ".tbac_pipeline",
    "GenerationOutput": ".tbac_pipeline",
    "CheckedInputs": ".tbac_pipeline",
    "Placement": ".placement",
    "MemoryModePlacement": ".placement",
    "PARTS": ".placement",
    "StepInfo": ".sampling",
    "PRESETS": ".understanding",
    "resolve_question": ".understanding",
    "answer": ".understanding",
    "answer_batch": ".understanding",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
