"""Streamed training data: WebDataset-style tar shards, read in order, never loaded whole.

A shard is a tar file (``.tar``, or gzip-compressed ``.tar.gz`` / ``.tgz``) whose members are
grouped by key, the WebDataset convention (the key is a member's path up to the first dot of its
file name; the members of one key are adjacent)::

    0001.png   0001.txt                     # text-to-image: the image and its caption
    0002.png   0002.txt   0002.source.png   # edit triple: target, instruction, source image

Other members (``.json``, ``.cls``, ...) are ignored. ``write_shards`` turns a folder read by
``training.data.scan_folder`` into shards.

Order: every epoch walks the shards in a seeded permutation of (seed, epoch), each shard front to
back (shuffle examples when writing shards; ``write_shards`` does). The global batch of step s is
examples s*B .. s*B+B-1 of that walk, so it does not depend on the number of processes, and a
resumed run skips to its position (whole shards are skipped without reading once their size is
known, i.e. after their first full read).
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from ..processing.images import pil_to_tensor
from .data import IMAGE_SUFFIXES, Batch, Example, load_square

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SOURCE_EXTENSION = "source"  # <key>.source.png: the edit's input image
CAPTION_EXTENSION = "txt"
MAX_IMAGE_BYTES = 64 * 2**20  # one encoded image member
MAX_TEXT_BYTES = 64 * 2**10  # one caption / instruction
MAX_RECORDS_PER_SHARD = 1_000_000
_IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ShardRecord:
    """One example as stored: encoded image bytes, decoded only by the process that trains on it."""

    key: str
    text: str
    target: bytes
    source: bytes | None
    shard: Path

    @property
    def is_edit(self) -> bool:
        return self.source is not None


def is_shard_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(SHARD_SUFFIXES) or glob.has_magic(str(path))


def expand_shards(paths: list[str | os.PathLike]) -> list[Path]:
    """Shard files from paths and glob patterns (``data/train-*.tar``), in the given order."""
    shards: list[Path] = []
    for path in paths:
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
        if not matches:
            raise InvalidParameterError(f"No tar shard matches {path}.")
        for match in matches:
            shard = Path(match)
            if not shard.is_file() or not shard.name.lower().endswith(SHARD_SUFFIXES):
                raise InvalidParameterError(
                    f"{shard} is not a tar shard file (expected {', '.join(SHARD_SUFFIXES)})."
                )
            shards.append(shard)
    return shards


def _split_name(name: str) -> tuple[str, str]:
    """``dir/0001.source.png`` -> (``dir/0001``, ``source.png``): the WebDataset key rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int, shard: Path) -> bytes:
    if member.size > limit:
        raise InvalidParameterError(
            f"{shard}: member {member.name} is {member.size} bytes; at most {limit} are allowed."
        )
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else b""


def _record(key: str, members: dict[str, bytes], shard: Path) -> ShardRecord:
    targets = [ext for ext in members if ext in _IMAGE_EXTENSIONS]
    sources = [ext for ext in members if ext.startswith(SOURCE_EXTENSION + ".")
               and ext.split(".", 1)[1] in _IMAGE_EXTENSIONS]
    layout = (f"expected {key}.png (or .jpg/.webp) + {key}.txt, plus {key}.source.png for an edit")
    if CAPTION_EXTENSION not in members:
        raise InvalidParameterError(f"{shard}: example {key} has no {key}.txt caption; {layout}.")
    if len(targets) != 1 or len(sources) > 1:
        found = ", ".join(sorted(members)) or "nothing"
        raise InvalidParameterError(f"{shard}: example {key} has members {found}; {layout}.")
    try:
        text = members[CAPTION_EXTENSION].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"{shard}: {key}.txt is not UTF-8 text ({exc}).") from exc
    return ShardRecord(key, text, members[targets[0]], members[sources[0]] if sources else None, shard)


def read_shard(shard: Path) -> Iterator[ShardRecord]:
    """The examples of one shard, streamed member by member (one example in memory at a time)."""
    seen: set[str] = set()
    key, members = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, extension = _split_name(member.name)
                if name_key != key:
                    if key is not None:
                        yield _record(key, members, shard)
                    if name_key in seen:
                        raise InvalidParameterError(
                            f"{shard}: the members of example {name_key} are not adjacent; write each "
                            f"example's files one after another (the WebDataset layout)."
                        )
                    if len(seen) >= MAX_RECORDS_PER_SHARD:
                        raise InvalidParameterError(
                            f"{shard} holds more than {MAX_RECORDS_PER_SHARD} examples; split it into smaller shards."
                        )
                    seen.add(name_key)
                    key, members = name_key, {}
                limit = MAX_TEXT_BYTES if extension == CAPTION_EXTENSION else MAX_IMAGE_BYTES
                if extension == CAPTION_EXTENSION or extension in _IMAGE_EXTENSIONS or \
                        extension.startswith(SOURCE_EXTENSION + "."):
                    if extension in members:
                        raise InvalidParameterError(f"{shard}: example {key} has two {extension} members.")
                    members[extension] = _read_member(tar, member, limit, shard)
            if key is not None:
                yield _record(key, members, shard)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, InvalidParameterError):
            raise
        raise InvalidParameterError(f"{shard} is not a readable tar shard ({exc}); it may be truncated or "
                                    f"corrupt.") from exc


class ShardStream:
    """Training data streamed from tar shards, with the interface the trainer needs of ``TrainingData``."""

    latents = None  # targets are encoded per step (TrainConfig.cache_latents applies to folders only)

    def __init__(self, shards: list[Path], resolution: int):
        if not shards:
            raise InvalidParameterError("No tar shards given.")
        self.shards = list(shards)
        self.resolution = resolution
        self._sizes: dict[int, int] = {}  # shard index -> examples, once read fully
        self._cursor: tuple[int, int, Iterator[ShardRecord]] | None = None  # (seed, position, records)
        self._batch: tuple[tuple[int, int, int], list[ShardRecord]] | None = None

    @classmethod
    def from_paths(cls, paths: list[str | os.PathLike], resolution: int) -> "ShardStream":
        return cls(expand_shards(paths), resolution)

    def describe(self) -> str:
        return f"{len(self.shards)} tar shard(s), streamed"

    def shard_order(self, epoch: int, seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def records(self, seed: int, position: int = 0) -> Iterator[ShardRecord]:
        """Endless walk over the epochs from example ``position`` (0-based, counted across epochs)."""
        epoch = 0
        while True:
            yielded_any = False
            for index in self.shard_order(epoch, seed):
                size = self._sizes.get(index)
                if size is not None and position >= size:
                    position -= size
                    yielded_any = yielded_any or size > 0
                    continue
                count = 0
                for record in read_shard(self.shards[index]):
                    count += 1
                    yielded_any = True
                    if position:
                        position -= 1
                        continue
                    yield record
                self._sizes[index] = count
            if not yielded_any:
                raise InvalidParameterError(f"The tar shards hold no examples: {', '.join(map(str, self.shards))}.")
            epoch += 1

    def global_batch(self, step: int, batch_size: int, seed: int) -> list[ShardRecord]:
        """The ``batch_size`` records of step ``step``; consecutive steps continue one stream."""
        key = (step, batch_size, seed)
        if self._batch is not None and self._batch[0] == key:
            return self._batch[1]
        start = step * batch_size
        if self._cursor is None or self._cursor[:2] != (seed, start):
            self._cursor = (seed, start, self.records(seed, start))
        records_iter = self._cursor[2]
        records = [next(records_iter) for _ in range(batch_size)]
        self._cursor = (seed, start + batch_size, records_iter)
        self._batch = (key, records)
        return records

    def batch_for(self, step: int, batch_size: int, seed: int, positions: list[int]) -> Batch:
        records = self.global_batch(step, batch_size, seed)
        chosen = [records[p] for p in positions]
        size = self.resolution

        def decode(data: bytes, record: ShardRecord, what: str):
            return load_square(io.BytesIO(data), size, where=f"{record.shard}:{record.key} ({what})")

        sources = [[decode(r.source, r, "source")] if r.is_edit else [] for r in chosen]
        targets = torch.stack([pil_to_tensor(decode(r.target, r, "target")) for r in chosen])
        return Batch([r.text for r in chosen], sources, targets=targets,
                     indices=[step * batch_size + p for p in positions])

    def sample_captions(self, count: int, look_at: int = 1000) -> list[str]:
        """The first ``count`` distinct captions of the first shard(s) (default sample prompts)."""
        captions: list[str] = []
        for looked, record in enumerate(r for shard in self.shards for r in read_shard(shard)):
            if len(captions) == count or looked == look_at:
                break
            if not record.is_edit and record.text not in captions:
                captions.append(record.text)
        return captions


def write_shards(examples: list[Example], folder: str | os.PathLike, per_shard: int = 1000, seed: int = 0,
                 prefix: str = "shard") -> list[Path]:
    """Write ``examples`` (from ``scan_folder``) as shuffled tar shards ``folder/prefix-NNNNNN.tar``."""
    if per_shard < 1:
        raise InvalidParameterError("per_shard must be >= 1.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    paths: list[Path] = []
    for first in range(0, len(order), per_shard):
        path = folder / f"{prefix}-{len(paths):06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in order[first: first + per_shard]:
                example = examples[index]
                key = f"{index:08d}"
                members = [(f"{key}{example.target.suffix.lower()}", example.target.read_bytes()),
                           (f"{key}.{CAPTION_EXTENSION}", example.text.encode("utf-8"))]
                if example.is_edit:
                    source = example.sources[0]
                    members.append((f"{key}.{SOURCE_EXTENSION}{source.suffix.lower()}", source.read_bytes()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
