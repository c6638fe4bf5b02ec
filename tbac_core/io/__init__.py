"""Files the library writes and reads besides checkpoints: safe writes, bounded JSON, rows files,
PNG parameter chunks. No torch."""
from .._exports import lazy_exports

_EXPORTS = {
    "MAX_NAME_BYTES": ".files",
    "atomic_path": ".files",
    "atomic_write": ".files",
    "atomic_write_json": ".files",
    "check_name_length": ".files",
    "next_counter": ".files",
    "safe_name": ".files",
    "write_new_file": ".files",
    "MAX_JSON_DEPTH": ".jsonfile",
    "parse_json": ".jsonfile",
    "read_json": ".jsonfile",
    "read_text_bounded": ".jsonfile",
    "Record": ".rows",
    "ROWS_EXTENSIONS": ".rows",
    "read_records": ".rows",
    "encode_png": ".pngmeta",
    "read_parameters": ".pngmeta",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
