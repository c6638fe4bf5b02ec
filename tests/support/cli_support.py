"""Helpers of the command-line tests: pixels and hashes of written files, the batch manifest, call counts."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from tbac_core.cli.batch import MANIFEST_NAME


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / MANIFEST_NAME).read_text().splitlines()]


class CountCalls:
    """Wraps a bound method and counts its calls (MLLM encodes, samplings)."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
