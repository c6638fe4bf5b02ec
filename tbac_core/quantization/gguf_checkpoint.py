"""TBAC checkpoints as ``.gguf``: a folder with ``config.json`` and ``model.gguf`` holding every tensor.

Tensor names are the official checkpoint keys (``model.transformer.transformer_blocks.0.attn1.to_q.weight``).
The selected linear weights are GGML blocks (Q8_0 / Q4_K / Q5_K); every other tensor keeps its
dtype (F32 / F16 / BF16). A row padded to whole blocks records its true width under
``tbac.in_features.<key>``. The ``gguf`` package reads and writes the container (an optional
dependency: ``pip install "tbac-uniimage[gguf]"``); the blocks are (de)quantised by ``ggml``.

``GGUFCheckpointFiles`` answers like ``loading.checkpoint.CheckpointFiles`` (``components``,
``shapes``, ``load_component``, ``read_rows``, ``describe``), so the loader reads either. Files are
written by ``convert.quantize_checkpoint`` (streamed, tensor by tensor).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..loading.checkpoint import COMPONENT_PREFIXES
from ..loading.safetensors_reader import map_file_private
from .ggml import FORMAT_BY_GGML_TYPE, padded_width
from .swap import BlockQuantizedWeight

GGUF_NAME = "model.gguf"
ARCHITECTURE = "tbacuniimage"
IN_FEATURES_KEY = "tbac.in_features."
FORMAT_KEY = "tbac.quantization"
_PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def require_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError('Reading or writing .gguf needs the gguf package: pip install "tbac-uniimage[gguf]" '
                              "(or pip install gguf).") from exc
    return gguf


def is_gguf_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / GGUF_NAME).is_file()


@dataclass
class GGUFCheckpointFiles:
    directory: Path
    path: Path
    reader: object
    tensors: dict = field(default_factory=dict)  # key -> gguf ReaderTensor
    in_features: dict = field(default_factory=dict)  # padded key -> true width
    components: dict[str, list[str]] = field(default_factory=dict)
    _map: torch.Tensor | None = field(default=None, repr=False)  # uint8 [file size], private mapping

    @classmethod
    def open(cls, checkpoint_dir: str | os.PathLike) -> "GGUFCheckpointFiles":
        gguf = require_gguf()
        directory = Path(checkpoint_dir)
        path = directory / GGUF_NAME
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad files
            raise CheckpointError(f"Cannot read {path} as GGUF ({type(exc).__name__}: {exc}). The file is "
                                  f"truncated or corrupt: convert or download it again.") from exc
        files = cls(directory, path, reader)
        architecture = files._field("general.architecture")
        if architecture != ARCHITECTURE:
            raise CheckpointError(f"{path} is a GGUF of architecture {architecture!r}; this loader reads "
                                  f"TBAC-UniImage GGUF files (architecture '{ARCHITECTURE}', written by "
                                  f"'python -m tbac_core quantize').")
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise CheckpointError(f"{path}: tensor {tensor.name} lies past the end of the file "
                                      f"({size} bytes); the file is truncated: convert or download it again.")
            files.tensors[tensor.name] = tensor
        for name in reader.fields:
            if name.startswith(IN_FEATURES_KEY):
                files.in_features[name[len(IN_FEATURES_KEY):]] = int(files._field(name))
        files.components = {name: [k for k in files.tensors if k.startswith(prefix)]
                            for name, prefix in COMPONENT_PREFIXES.items()}
        empty = [name for name, keys in files.components.items() if not keys]
        if empty:
            raise CheckpointError(f"{path} has no weights for: {', '.join(empty)}. This is not a complete "
                                  f"TBAC-UniImage checkpoint.")
        return files

    def _field(self, name: str):
        field_ = self.reader.fields.get(name)
        return None if field_ is None else field_.contents()

    @property
    def key_to_file(self) -> dict[str, Path]:
        return {key: self.path for key in self.tensors}

    @property
    def quantization(self) -> str | None:
        return self._field(FORMAT_KEY)

    def describe(self) -> str:
        return f"{self.directory} ({GGUF_NAME})"

    def _shape(self, key: str) -> tuple[int, ...]:
        tensor = self.tensors[key]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dimension first
        if tensor.tensor_type in FORMAT_BY_GGML_TYPE:
            shape = (*shape[:-1], self.in_features.get(key, shape[-1]))
        return shape

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        prefix = COMPONENT_PREFIXES[component]
        return {key[len(prefix):]: self._shape(key) for key in self.components[component]}

    def _file_bytes(self) -> torch.Tensor:
        """The whole file as uint8 over a private memory map, made on the first read."""
        if self._map is None:
            self._map = map_file_private(self.path, self.path.stat().st_size)
        return self._map

    def _read(self, key: str, dtype: torch.dtype | None, device):
        """``key`` as a view of the file's map (no copy) when no cast or move is asked, else converted.

        Copying every tensor out of the map (``np.array(tensor.data)``) held each one twice, once in
        the page cache counted in this process's RSS and once in the copy: measured on the real
        3B architecture in Q8_0, a load peak of 15.1 GiB for a 7.5 GiB file.
        """
        tensor = self.tensors[key]
        begin, nbytes = int(tensor.data_offset), int(tensor.n_bytes)
        raw = self._file_bytes()[begin: begin + nbytes]  # bounds checked against the file size at open
        shape = self._shape(key)
        fmt = FORMAT_BY_GGML_TYPE.get(int(tensor.tensor_type))
        if fmt is not None:
            if padded_width(shape[-1], fmt) != int(tensor.shape[0]):
                raise CheckpointError(f"{self.path}: tensor {key} records width {shape[-1]} but stores "
                                      f"{int(tensor.shape[0])} values per row; the file is corrupt.")
            return BlockQuantizedWeight(raw.reshape(shape[0], -1).to(device), fmt, shape)
        type_name = tensor.tensor_type.name
        if type_name not in _PLAIN_TYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has GGML type {type_name}; TBAC GGUF files use "
                                  f"{', '.join(FORMAT_BY_GGML_TYPE[t].name.upper() for t in FORMAT_BY_GGML_TYPE)} "
                                  f"or {', '.join(_PLAIN_TYPES)}.")
        stored = _PLAIN_TYPES[type_name]
        if begin % stored.itemsize:  # not aligned for a view (the gguf writer aligns to 32 bytes)
            raw = raw.clone()
        value = raw.view(stored).reshape(shape)
        if dtype is not None:
            value = value.to(dtype)
        return value.to(device)

    def load_component(self, component: str, dtype: torch.dtype | None, device="cpu") -> dict:
        """One component's tensors, prefix stripped; quantised weights as ``BlockQuantizedWeight``."""
        prefix = COMPONENT_PREFIXES[component]
        return {key[len(prefix):]: self._read(key, dtype, device) for key in self.components[component]}

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a plain tensor in its stored dtype (the metaquery fingerprint)."""
        return self._read(key, None, "cpu")[start:stop]

