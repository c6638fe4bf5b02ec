"""Training data: image/caption folders and edit-triple folders.

Text-to-image (the layout of common fine-tuning tools)::

    data/
      cat_001.png    cat_001.txt       # the caption, UTF-8 (surrounding whitespace is stripped)
      sub/dog.jpg    sub/dog.txt       # sub-folders are searched too

Instruction editing (source image, instruction, target image)::

    edits/
      0001_source.png  0001.txt  0001_target.png    # 0001.txt holds the instruction

An edit folder is recognised by its ``*_source.*`` files. A folder may hold both kinds: a
``NAME.txt`` next to ``NAME_source.*`` and ``NAME_target.*`` is an edit triple, a ``NAME.txt``
next to ``NAME.*`` an image/caption pair. An image without its text file (or a triple missing a
part) is an error that names the file, rather than a silently smaller dataset.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image

from ..errors import InvalidParameterError
from ..processing.images import pil_to_tensor, to_pil_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCE_TAG = "_source"
TARGET_TAG = "_target"


@dataclass(frozen=True)
class Example:
    """One training example: the MLLM sees ``text`` (+ ``sources``), the DiT learns ``target``."""

    text: str
    target: Path
    sources: tuple[Path, ...] = ()

    @property
    def is_edit(self) -> bool:
        return bool(self.sources)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"{path} is not UTF-8 text ({exc}); save captions as UTF-8.") from exc


def scan_folder(folder: str | os.PathLike) -> list[Example]:
    """Every caption pair and edit triple under ``folder``, sorted by path (deterministic)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidParameterError(f"Training data folder not found: {folder}.")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    by_stem: dict[Path, Path] = {}
    for image in images:
        key = image.with_suffix("")
        if key in by_stem:
            raise InvalidParameterError(f"Two images share the name {key}: {by_stem[key].name} and {image.name}.")
        by_stem[key] = image
    examples: list[Example] = []
    problems: list[str] = []
    for key, image in sorted(by_stem.items()):
        name = key.name
        if name.endswith(TARGET_TAG):
            base = key.with_name(name[: -len(TARGET_TAG)])
            if base.with_name(base.name + SOURCE_TAG) not in by_stem:
                problems.append(f"{image} has no {base.name}{SOURCE_TAG}.* source image")
            continue
        if name.endswith(SOURCE_TAG):
            base = key.with_name(name[: -len(SOURCE_TAG)])
            target = by_stem.get(base.with_name(base.name + TARGET_TAG))
            text = base.with_suffix(".txt")
            if target is None:
                problems.append(f"{image} has no {base.name}{TARGET_TAG}.* target image")
            elif not text.is_file():
                problems.append(f"{image} has no instruction file {text.name}")
            else:
                examples.append(Example(_read_text(text), target, (image,)))
            continue
        text = key.with_suffix(".txt")
        if not text.is_file():
            problems.append(f"{image} has no caption file {text.name}")
        else:
            examples.append(Example(_read_text(text), image))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InvalidParameterError(
            f"Incomplete training data in {folder}: {shown}. Layout: NAME.png + NAME.txt (caption), or "
            f"NAME{SOURCE_TAG}.png + NAME.txt (instruction) + NAME{TARGET_TAG}.png (edit)."
        )
    if not examples:
        raise InvalidParameterError(
            f"No training examples in {folder}: expected images with same-named .txt captions "
            f"({', '.join(IMAGE_SUFFIXES)})."
        )
    return examples


def load_square(path: Path | BinaryIO, size: int, where: str | None = None) -> Image.Image:
    """Open an image (a file, or a binary stream named ``where``) as RGB, resize its short side to
    ``size`` and centre-crop a square."""
    try:
        with Image.open(path) as handle:
            image = to_pil_rgb(handle)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidParameterError(f"Cannot read training image {where or path}: {exc}") from exc
    return square_crop(image, size)


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize an RGB image's short side to ``size`` and centre-crop a square."""
    width, height = image.size
    scale = size / min(width, height)
    if (width, height) != (size, size):
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


@dataclass
class Batch:
    texts: list[str]
    sources: list[list[Image.Image]]  # per example; empty for text-to-image
    targets: torch.Tensor | None = None  # [B, H, W, 3] in 0..1 (when latents are not cached)
    latents: torch.Tensor | None = None  # [B, C, h, w] (cached)
    indices: list[int] = field(default_factory=list)


class TrainingData:
    """Examples + deterministic, resumable shuffling + optional cached target latents."""

    def __init__(self, examples: list[Example], resolution: int):
        self.examples = examples
        self.resolution = resolution
        self.latents: torch.Tensor | None = None  # [len, C, h, w]
        self._order: tuple[int, int, torch.Tensor] | None = None  # (epoch, seed, permutation)

    @classmethod
    def from_folders(cls, folders: list[str | os.PathLike], resolution: int) -> "TrainingData":
        examples = [ex for folder in folders for ex in scan_folder(folder)]
        return cls(examples, resolution)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_edits(self) -> int:
        return sum(ex.is_edit for ex in self.examples)

    def cache_latents(self, encode, batch_size: int = 64) -> None:
        """Encode every target once with ``encode(images [B, H, W, 3]) -> latents`` (VAE frozen)."""
        chunks = []
        for start in range(0, len(self.examples), batch_size):
            part = self.examples[start: start + batch_size]
            images = torch.stack([pil_to_tensor(load_square(ex.target, self.resolution)) for ex in part])
            chunks.append(encode(images).float().cpu())
        self.latents = torch.cat(chunks)

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        if self._order is None or self._order[:2] != (epoch, seed):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._order = (epoch, seed, torch.randperm(len(self.examples), generator=generator))
        return self._order[2]

    def batch_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Example indices of optimisation step ``step`` (0-based): epochs of seeded permutations.

        A function of (step, seed) only, so a resumed run sees exactly the batches it would have.
        """
        count = len(self.examples)
        first = step * batch_size
        indices = []
        for position in range(first, first + batch_size):
            epoch, offset = divmod(position, count)
            indices.append(int(self.order(epoch, seed)[offset]))
        return indices

    def batch_for(self, step: int, batch_size: int, seed: int, positions: list[int]) -> Batch:
        """The examples at ``positions`` (0..batch_size-1) of the global batch of ``step``."""
        indices = self.batch_indices(step, batch_size, seed)
        return self.batch([indices[p] for p in positions])

    def sample_captions(self, count: int) -> list[str]:
        """The first ``count`` distinct text-to-image captions (default sample prompts)."""
        captions: list[str] = []
        for example in self.examples:
            if not example.is_edit and example.text not in captions:
                captions.append(example.text)
            if len(captions) == count:
                break
        return captions

    def describe(self) -> str:
        return f"{len(self)} examples ({self.num_edits} edits)"

    def batch(self, indices: list[int]) -> Batch:
        examples = [self.examples[i] for i in indices]
        sources = [[load_square(p, self.resolution) for p in ex.sources] for ex in examples]
        texts = [ex.text for ex in examples]
        if self.latents is not None:
            return Batch(texts, sources, latents=self.latents[indices], indices=list(indices))
        targets = torch.stack([pil_to_tensor(load_square(ex.target, self.resolution)) for ex in examples])
        return Batch(texts, sources, targets=targets, indices=list(indices))

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.examples) / batch_size)
