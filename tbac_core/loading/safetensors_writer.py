"""Writing a ``.safetensors`` file tensor by tensor, so that only one tensor is in memory at a time.

``safetensors.torch.save_file`` takes every tensor at once and serialises them into one buffer: for
a checkpoint that is being made (quantising the 11.4 GB TBAC-UniImage-3B), every new tensor and
then a second copy of its bytes are held together. The format allows streaming: a little-endian u64
header length, a JSON header giving each tensor's dtype, shape and byte range, then the bytes in
that order with no gaps. The header is written from the tensors' announced dtypes and shapes; each
tensor's bytes follow when it is made, checked against what was announced. What is written is read
back by ``safetensors``' own readers (tests).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import CheckpointError
from .safetensors_reader import HEADER_LENGTH_BYTES, SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
HEADER_ALIGNMENT = 8  # the header is padded with spaces so that the data starts 8-byte aligned


@dataclass(frozen=True)
class TensorSpec:
    """A tensor announced in the header: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsStreamWriter:
    """Writes the header of ``specs`` at once, then each tensor's bytes with ``write``, in ``specs`` order."""

    def __init__(self, handle: BinaryIO, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        unknown = [spec.name for spec in specs if spec.dtype not in DTYPE_NAMES]
        if unknown:
            raise CheckpointError(f"Cannot write tensor(s) {', '.join(unknown[:4])} to safetensors: their dtype has "
                                  f"no safetensors name.")
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(HEADER_LENGTH_BYTES + len(text)) % HEADER_ALIGNMENT)
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        self.handle = handle
        self.pending = list(reversed(specs))  # the next tensor to write is last

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``name``'s bytes; it must be the next announced tensor, with its dtype and shape."""
        if not self.pending:
            raise ValueError(f"{name}: every announced tensor was written already")
        spec = self.pending[-1]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(f"expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if spec.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self.handle.write(memoryview(data.numpy()))
        self.pending.pop()

    def finish(self) -> None:
        """Check that every announced tensor was written (a short file would be refused when read)."""
        if self.pending:
            raise ValueError(f"{len(self.pending)} announced tensor(s) not written, first {self.pending[-1].name}")
