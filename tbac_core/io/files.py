"""Writing files so that a crash or a second writer never leaves a half or overwritten file.

One family for every file the library writes:

* :func:`atomic_path` / :func:`atomic_write`: the file at ``path`` is absent, the old one or the
  complete new one, never half written; ``overwrite=False`` never replaces an existing file.
* :func:`write_new_file`: ``<stem><suffix>``, else ``<stem>-1<suffix>``, ``-2``...: a new file
  every call, even with several processes writing to one folder.
* :func:`next_counter`: ComfyUI-style numbering, ``<stem>_<counter>_...``: 1 + the highest in use.
* :func:`safe_name` / :func:`check_name_length`: user text (row ids, prefixes) as a file name.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutputExistsError, UsageError

# The longest file name (in bytes, one path component) that ext4, APFS, NTFS and others all take.
MAX_NAME_BYTES = 255
MAX_COUNTER = 100_000
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: Any) -> str:
    """``value`` usable as a file name on every OS: letters, digits, ``.``, ``_`` and ``-`` only.

    Anything else (spaces, slashes, NUL bytes, non-ASCII) becomes ``_``; leading/trailing dots and
    underscores go, so the result is never hidden, never ``..`` and may be empty (callers refuse that).
    """
    return _UNSAFE_CHARS.sub("_", str(value)).strip("._")


def check_path_text(path: str, what: str) -> None:
    """Refuse a path typed by a user that no file system takes: a NUL byte, text that is not valid
    Unicode (a lone surrogate), or a part (file or folder name) over ``MAX_NAME_BYTES``."""
    if not isinstance(path, str):
        raise UsageError(f"{what} must be text, got {type(path).__name__}.")
    if "\x00" in path:
        raise UsageError(f"{what} {path!r} holds a NUL byte, which no file name may contain; remove it.")
    for part in path.replace("\\", "/").split("/"):
        check_name_length(part, what)


def check_name_length(name: str, what: str) -> None:
    """Refuse a file name longer than the file systems allow, before anything is rendered."""
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} gives the file name {name[:40]!r}, which is not valid Unicode text (character "
                         f"{name[exc.start]!r}); retype it.") from None
    if size > MAX_NAME_BYTES:
        raise UsageError(f"{what} gives the file name {name[:40]}... of {size} bytes; file names may have at most "
                         f"{MAX_NAME_BYTES} bytes: use a shorter name.")


def temp_name(path: Path) -> Path:
    # Hidden and ending in ``.part``, so neither a reader nor a resumed batch mistakes it for an output;
    # the name part is cut so that a name near the length limit still gets a valid temporary name.
    return path.with_name(f".{path.name[:MAX_NAME_BYTES - 32]}.{uuid.uuid4().hex[:8]}.part")


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename without ever replacing an existing file (a hard link fails if the target exists)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise OutputExistsError(target) from None
    except OSError:  # file systems without hard links: check, then rename (a small race remains)
        if target.exists():
            raise OutputExistsError(target) from None
        os.replace(source, target)


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it fully, and on success it becomes ``path``.

    For writers that want a path rather than bytes (``safetensors.torch.save_file``). On any error
    the temporary file is removed and ``path`` is untouched. ``overwrite=False``: raise
    ``FileExistsError`` instead of replacing an existing ``path``.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)  # after a no-replace rename the hard-linked temp name is still there
        except FileNotFoundError:
            pass


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file or complete."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> None:
    """``data`` as indented UTF-8 JSON (a trailing newline), written atomically."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))


def write_new_file(folder: str | os.PathLike, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``<stem><suffix>`` in ``folder``, or ``<stem>-1<suffix>``, ``-2``... if taken: never overwrite.

    The name is reserved with an exclusive create, then the complete file replaces it, so two
    processes writing to one folder cannot take the same name and no half file stays behind.
    """
    folder = Path(folder)
    check_name_length(f"{stem}-{MAX_COUNTER}{suffix}", f"The name {stem!r}")
    for counter in range(MAX_COUNTER):
        path = folder / (f"{stem}{suffix}" if counter == 0 else f"{stem}-{counter}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        atomic_write(path, data)
        return path
    raise UsageError(f"Too many files named {stem}-N{suffix} in {folder}; use another name or folder.")


def next_counter(folder: str | os.PathLike, stem: str, suffix: str) -> int:
    """1 + the highest counter of ``<stem>_<counter><suffix>`` in ``folder`` (1 when none).

    ComfyUI's numbering (``name_00001_.png``): pass ``suffix="_.png"``. Write the name with
    ``overwrite=False`` and count again on ``FileExistsError`` (another writer took the number).
    """
    folder = Path(folder)
    highest = 0
    if folder.is_dir():
        for path in folder.iterdir():
            name = path.name
            if name.startswith(f"{stem}_") and name.endswith(suffix) and len(name) > len(stem) + 1 + len(suffix):
                digits = name[len(stem) + 1: len(name) - len(suffix)]
                if digits.isascii() and digits.isdigit():
                    highest = max(highest, int(digits))
    return highest + 1
