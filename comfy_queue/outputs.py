"""Output files: their local names and writing them atomically.

Names are ``<row-id>_<node-id>_<n><ext>``, with ``n`` counting the node's files in a fixed order, so
the same row always produces the same names. Two outputs never share a name: a name another output
(of this row or another row, on case-insensitive file systems too) already holds gets a short hash
of its row, node and number appended.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from typing import Any, BinaryIO, Iterator, Mapping

from .rows import safe_name

MAX_NODE_PART = 40  # characters of a node id kept in a file name; longer ids are cut and hashed
MAX_EXT_LENGTH = 16


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once complete: ``path`` is either absent, the old
    file or the new one. On any failure the partial file is removed.

    The temporary name is hidden and ends in ``.part``, so neither a reader nor resume mistakes it
    for an output.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_writer``)."""
    with atomic_writer(path) as f:
        f.write(data)


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _node_sort_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def output_name(row_id: str, node_id: str, n: int, ext: str) -> str:
    """The plain local name of output ``n`` of ``node_id`` (``ext`` with its dot)."""
    node = safe_name(node_id) or "node"
    if len(node) > MAX_NODE_PART:
        node = f"{node[:MAX_NODE_PART]}-{_short_hash(node_id)}"
    ext = safe_name(ext[1:])[:MAX_EXT_LENGTH]
    return f"{row_id}_{node}_{n}.{ext or 'bin'}"


def output_files(outputs: Mapping[str, Any], row_id: str, include_temp: bool = True):
    """Yield ``(local_name, filename, subfolder, type)`` for every file in a history entry's outputs.

    Names are distinct within the row (node ids that look alike once made file-name safe included).
    """
    if not isinstance(outputs, Mapping):
        return
    taken: set[str] = set()
    for node_id in sorted((k for k in outputs if isinstance(k, str)), key=_node_sort_key):
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        n = 0
        for kind in sorted(k for k in node_out if isinstance(k, str)):  # images, gifs, audio, ...
            items = node_out[kind]
            for item in items if isinstance(items, list) else ():
                if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
                    continue
                file_type = item.get("type") or "output"
                if file_type == "temp" and not include_temp:
                    continue
                subfolder = item.get("subfolder") or ""
                name = output_name(row_id, node_id, n, os.path.splitext(item["filename"])[1])
                if name.casefold() in taken:
                    name = _disambiguate(name, row_id, node_id, n)
                taken.add(name.casefold())
                yield name, item["filename"], subfolder if isinstance(subfolder, str) else "", str(file_type)
                n += 1


def _disambiguate(name: str, *owner: Any) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}-{_short_hash(*map(str, owner))}{ext}"


class OutputNames:
    """The local names held by the rows of one output folder, shared by the worker threads.

    Seeded from the manifest, so a rerun never hands a finished row's file to another row. Names are
    compared case-folded: ``Cat_9_0.png`` and ``cat_9_0.png`` are one file on macOS and Windows.
    """

    def __init__(self, held: Mapping[str, str] = ()):
        self._owner: dict[str, str] = {name.casefold(): row for name, row in dict(held).items()}
        self._lock = threading.Lock()

    def claim(self, name: str, row_id: str) -> str:
        """``name`` if it is free or already ``row_id``'s, else a distinct name derived from it."""
        with self._lock:
            candidate, attempt = name, 0
            while self._owner.setdefault(candidate.casefold(), row_id) != row_id:
                attempt += 1
                candidate = _disambiguate(name, row_id, attempt)
            return candidate
