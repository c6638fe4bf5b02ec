"""Input images given by path: the one check of a path (for every command), reading and fitting.

:func:`image_path_problem` only looks at the file's kind and size (``os.stat``), so it runs in
microseconds before the model loads, and a device file, a FIFO, a folder or a missing file is
refused instead of read until memory runs out, hanging, or raising a raw traceback.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UsageError

MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024  # far above any photo; refuses reading a huge file whole


def image_path_problem(path: str) -> str | None:
    """What is wrong with ``path`` as an input image file, or None when it can be read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"no such image file: {path}"
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return f"cannot open the image file {path}: {getattr(exc, 'strerror', None) or exc}"
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (a device, FIFO or socket); give an image file"
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        return f"{path} has {info.st_size} bytes; image files may have at most {MAX_IMAGE_FILE_BYTES} bytes"
    if not os.access(path, os.R_OK):
        return f"cannot open the image file {path}: permission denied"
    return None


def check_image_path(path: str, what: str = "image") -> None:
    """Raise a ``UsageError`` naming ``what`` (e.g. ``--image``) when ``path`` is not a readable image file."""
    problem = image_path_problem(path)
    if problem:
        raise UsageError(f"{what}: {problem}")


@dataclass
class InputImage:
    image: Image.Image  # RGB
    record: dict  # {"name": file name, "sha256": of the file bytes}


def load_input_image(path: str) -> InputImage:
    from ..processing import to_pil_rgb  # torch: only once an image is really used

    check_image_path(path)
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as opened:
            image = to_pil_rgb(opened.copy())
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's ways of saying "not an image"
        raise UsageError(f"Cannot read {path} as an image: {exc}") from exc
    return InputImage(image, {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()})


def file_sha256(path: str) -> str:
    check_image_path(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_init_image(image: Image.Image, width: int | None, height: int | None, factor: int) -> Image.Image:
    """The init image at the requested size (if any), centre-cropped to multiples of ``factor``."""
    size = (width or image.width, height or image.height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    new_w, new_h = image.width - image.width % factor, image.height - image.height % factor
    if (new_w, new_h) != image.size and new_w and new_h:
        left, top = (image.width - new_w) // 2, (image.height - new_h) // 2
        image = image.crop((left, top, left + new_w, top + new_h))
    return image


class ImageCache:
    """Input images of recent rows, keyed by path + modification time (rows often share images)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: dict[tuple, InputImage] = {}

    def __call__(self, path: str) -> InputImage:
        check_image_path(path)
        info = os.stat(path)
        key = (os.path.abspath(path), info.st_mtime_ns, info.st_size)
        if key not in self._items:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = load_input_image(path)
        return self._items[key]
