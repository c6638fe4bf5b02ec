"""Reading checkpoints in the official format: files, component configs, folders and adapters."""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".build": ("load_model", "find_tokenizer_dir"),
    ".checkpoint": ("read_checkpoint_config", "CheckpointFiles"),
    ".components": ("TBACConfig", "MODELS_DIR_ENV", "search_dirs", "resolve_component_dir"),
    ".folders": ("list_checkpoints", "resolve_checkpoint"),
    ".adapters": ("apply_adapter", "list_adapters"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
