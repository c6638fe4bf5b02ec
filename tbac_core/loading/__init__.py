"""Reading checkpoints in the official format: files, component configs, folders and adapters."""
from .._exports import lazy_exports

_EXPORTS = {
    "load_model": ".build",
    "find_tokenizer_dir": ".build",
    "read_checkpoint_config": ".checkpoint",
    "CheckpointFiles": ".checkpoint",
    "TBACConfig": ".components",
    "MODELS_DIR_ENV": ".components",
    "search_dirs": ".components",
    "resolve_component_dir": ".components",
    "list_checkpoints": ".folders",
    "resolve_checkpoint": ".folders",
    "apply_adapter": ".adapters",
    "list_adapters": ".adapters",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
