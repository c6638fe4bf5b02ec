"""Ladder-side diffusion tuning (the TBAC-UniImage training recipe) on a loaded ``TBACModel``.

The MLLM stays frozen; the metaquery embedding rows, the connector and the DiT (fully, or LoRA
adapters on it) are trained with the flow-matching objective, and saved as a trained-parts folder
that ``tbac_core.loading.adapters.apply_adapter`` loads on top of the base checkpoint.

Exports load lazily (torch on first use), so the command line registers ``train`` without torch.
"""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".data": ("Example", "TrainingData", "scan_folder"),
    ".shards": ("ShardStream", "write_shards"),
    ".flow": ("FlowMatchingObjective",),
    ".parts": ("DEFAULT_LORA_TARGETS", "MetaqueryRows", "TrainableParts"),
    ".trainer": ("TrainConfig", "Trainer", "TrainResult"),
    "..errors": ("TrainingDivergedError",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
