"""``quantize_checkpoint``: an official checkpoint folder -> an fp8 or GGUF checkpoint folder.

fp8 writes the official layout (``config.json`` + ``model.safetensors``) with ``float8_e4m3fn``
linear weights and their ``scale_weight`` next to them; Q8_0 / Q5_K / Q4_K write ``config.json`` +
``model.gguf``. Everything else in the source folder (component configs, tokenizer files) is copied,
so the new folder loads on its own with ``load_model``.

The weights stream: the output's header is planned from the source headers, then each tensor is
read from its shard (``readinto``, not a map), quantised, written and dropped before the next. Peak
memory is about the largest tensor a few times over (the embedding, ~0.6 GB for TBAC-UniImage-3B),
not the checkpoint (quantising everything in memory first peaked at 19 GiB for its 10.6 GiB). The
folder appears complete or not at all: it is written under a temporary name and renamed at the end.
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..io.files import temp_name
from ..loading.checkpoint import (
    COMPONENT_PREFIXES,
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE_NAME,
    CheckpointFiles,
    read_checkpoint_config,
)
from ..loading.safetensors_reader import SafetensorsFile
from ..loading.safetensors_writer import SafetensorsStreamWriter, TensorSpec
from .fp8 import FP8_DTYPE, SCALE_SUFFIX
from .ggml import BLOCK_FORMATS, padded_width, row_bytes
from .gguf_checkpoint import ARCHITECTURE, FORMAT_KEY, GGUF_NAME, IN_FEATURES_KEY, require_gguf
from .swap import FORMATS, BlockQuantizedWeight, is_quantizable, quantize_state

_WEIGHT_FILES = (SINGLE_FILE_NAME, INDEX_NAME, GGUF_NAME)
_GGUF_PLAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source checkpoint, and whether it is quantised."""

    key: str  # full checkpoint key
    component: str
    local_key: str  # the key without the component prefix (what ``quantize_state`` takes)
    dtype: torch.dtype
    shape: tuple[int, ...]
    quantized: bool

    @property
    def nbytes(self) -> int:  # as stored
        return math.prod(self.shape) * self.dtype.itemsize


def quantize_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, format: str = "fp8") -> Path:
    """Write ``src_dir`` quantised to ``format`` (one of ``FORMATS``) into ``out_dir``; returns it."""
    if format not in FORMATS:
        raise CheckpointError(f"Unknown quantization format {format!r}; choose one of {', '.join(FORMATS)}.")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    read_checkpoint_config(src_dir)
    files = CheckpointFiles.open(src_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise CheckpointError(f"The output folder {out_dir} is the source checkpoint; choose another.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"The output folder {out_dir} is not empty; choose a new or empty folder.")
    sources = plan_sources(files, format)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(out_dir)
    staging.mkdir()
    try:
        _copy_small_files(src_dir, staging)
        with ExitStack() as stack:
            read = _tensor_reader(files, stack)
            if format == "fp8":
                _write_fp8(staging / SINGLE_FILE_NAME, sources, read)
            else:
                _write_gguf(staging / GGUF_NAME, sources, read, format)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): the finished folder takes its place
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def plan_sources(files: CheckpointFiles, format: str) -> list[SourceTensor]:
    """Every source tensor with its stored dtype and shape (headers only), in the order it is written."""
    sources = []
    for component, prefix in COMPONENT_PREFIXES.items():
        for path, keys in files.keys_by_file(component).items():
            with SafetensorsFile.open(path) as file:
                for key in keys:
                    entry = file.entry(key)
                    local = key[len(prefix):]
                    quantized = (entry.dtype.is_floating_point and entry.dtype != FP8_DTYPE
                                 and is_quantizable(component, local, entry.shape))
                    if format != "fp8" and not quantized and entry.dtype not in _GGUF_PLAIN_DTYPES:
                        raise CheckpointError(f"Cannot store tensor {key} of dtype {entry.dtype} in GGUF (it takes "
                                              f"float32, float16 and bfloat16 besides the quantised weights).")
                    sources.append(SourceTensor(key, component, local, entry.dtype, entry.shape, quantized))
    # Wider elements first (as safetensors' own writer orders them), so that every tensor of a
    # mapped file stays aligned to its element size; the fp8 weights' scales go last.
    return sorted(sources, key=lambda s: (s.quantized, -s.dtype.itemsize, s.key))


def _tensor_reader(files: CheckpointFiles, stack: ExitStack):
    """``read(key)`` -> the tensor as stored, copied into its own buffer; each shard opened once."""
    opened: dict[Path, SafetensorsFile] = {}

    def read(key: str) -> torch.Tensor:
        path = files.key_to_file[key]
        if path not in opened:
            opened[path] = stack.enter_context(SafetensorsFile.open(path))
        return opened[path].copied(key)

    return read


def _quantized(source: SourceTensor, tensor: torch.Tensor, format: str) -> dict:
    """``quantize_state`` of one tensor -> its output entries, keys made full again."""
    prefix = COMPONENT_PREFIXES[source.component]
    return {prefix + key: value for key, value in quantize_state(source.component, {source.local_key: tensor},
                                                                 format).items()}


def _scale_key(key: str) -> str:
    return key[: -len("weight")] + SCALE_SUFFIX


def _write_fp8(path: Path, sources: list[SourceTensor], read) -> None:
    specs = [TensorSpec(s.key, FP8_DTYPE if s.quantized else s.dtype, s.shape) for s in sources]
    specs += [TensorSpec(_scale_key(s.key), torch.float32, ()) for s in sources if s.quantized]
    scales: dict[str, torch.Tensor] = {}
    with open(path, "wb") as handle:
        writer = SafetensorsStreamWriter(handle, specs, {"format": "pt", "tbac.quantization": "fp8"})
        for source in sources:
            tensor = read(source.key)
            if source.quantized:
                entries = _quantized(source, tensor, "fp8")
                scales[_scale_key(source.key)] = entries.pop(_scale_key(source.key))
                tensor = entries[source.key]
            writer.write(source.key, tensor)
        for name, scale in scales.items():
            writer.write(name, scale.reshape(()))
        writer.finish()


def _write_gguf(path: Path, sources: list[SourceTensor], read, format: str) -> None:
    gguf = require_gguf()
    block_format = BLOCK_FORMATS[format]
    ggml_type = gguf.GGMLQuantizationType(block_format.ggml_type)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(FORMAT_KEY, format)
    for source in sources:
        if source.quantized:
            out_features, in_features = source.shape
            if padded_width(in_features, block_format) != in_features:
                writer.add_uint32(IN_FEATURES_KEY + source.key, in_features)
            nbytes = out_features * row_bytes(in_features, block_format)
            writer.add_tensor_info(source.key, (out_features, nbytes // out_features), np.dtype(np.uint8), nbytes,
                                   raw_dtype=ggml_type)
        else:
            numpy_dtype, raw = _gguf_plain_type(source.dtype, gguf)
            writer.add_tensor_info(source.key, source.shape, numpy_dtype, source.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for source in sources:
        tensor = read(source.key)
        if source.quantized:
            value: BlockQuantizedWeight = _quantized(source, tensor, format)[source.key]
            writer.write_tensor_data(value.data.numpy())
        elif source.dtype == torch.bfloat16:
            writer.write_tensor_data(tensor.contiguous().view(torch.int16).numpy().view(np.uint16))
        else:
            writer.write_tensor_data(tensor.contiguous().numpy())
    writer.close()


def _gguf_plain_type(dtype: torch.dtype, gguf):
    """(numpy dtype, GGML type or None) of a tensor stored unquantised in GGUF."""
    if dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes as uint16, typed BF16
        return np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16
    return np.dtype({torch.float32: np.float32, torch.float16: np.float16}[dtype]), None


def _copy_small_files(src_dir: Path, out_dir: Path) -> None:
    for entry in src_dir.iterdir():
        if entry.name in _WEIGHT_FILES or (entry.name.startswith("model-") and entry.suffix == ".safetensors"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name)
        else:
            shutil.copy2(entry, out_dir / entry.name)
    if not (out_dir / CONFIG_NAME).is_file():
        raise CheckpointError(f"{src_dir} has no {CONFIG_NAME} to copy.")
