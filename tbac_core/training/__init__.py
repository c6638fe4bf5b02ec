"""Ladder-side diffusion tuning (the TBAC-UniImage training recipe) on a loaded ``TBACModel``.

The MLLM stays frozen; the metaquery embedding rows, the connector and the DiT (fully, or LoRA
adapters on it) are trained with the flow-matching objective, and saved as a trained-parts folder
that ``tbac_core.loading.adapters.apply_adapter`` loads on top of the base checkpoint.
"""
from .data import Example, TrainingData, scan_folder
from .flow import FlowMatchingObjective
from .parts import DEFAULT_LORA_TARGETS, MetaqueryRows, TrainableParts
from .shards import ShardStream, write_shards
from .trainer import TrainConfig, Trainer, TrainingDivergedError, TrainResult

__all__ = [
    "DEFAULT_LORA_TARGETS", "Example", "FlowMatchingObjective", "MetaqueryRows", "TrainConfig", "TrainResult",
    "Trainer", "TrainableParts", "TrainingData", "TrainingDivergedError", "scan_folder",
    "ShardStream", "write_shards",
]
