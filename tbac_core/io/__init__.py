"""Files the library writes and reads besides checkpoints: safe writes, bounded JSON, rows files,
PNG parameter chunks. No torch."""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".files": (
        "MAX_NAME_BYTES", "atomic_path", "atomic_write", "atomic_write_json", "check_name_length", "check_path_text",
        "next_counter",
        "safe_name", "write_new_file",
    ),
    ".jsonfile": ("MAX_JSON_DEPTH", "parse_json", "read_json", "read_text_bounded"),
    ".rows": ("Record", "ROWS_EXTENSIONS", "read_records"),
    ".pngmeta": ("encode_png", "read_parameters"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
