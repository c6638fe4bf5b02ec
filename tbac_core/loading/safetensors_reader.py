"""Reading the tensors of one ``.safetensors`` file three ways: mapped, copied, or streamed to a GPU.

The file format is a little-endian u64 header length, a JSON header (name -> dtype, shape,
``data_offsets``), then the raw tensor bytes. Every tensor's entry is checked against the file
(known dtype, byte length = shape x element size, inside the file) before any byte is used.

* ``mapped``: a view of a private memory map of the file (zero copy). Used on the CPU when the stored
  dtype is the target dtype. Pages are read from disk when first touched and stay file-backed
  (clean, reclaimable by the kernel) until written.
* ``cast``: the bytes read with ``readinto``, chunk by chunk through one reused 16 MiB buffer, into
  a tensor of the target dtype. Used when the tensor is cast (bf16 file, fp32 model): reading it
  through the map would keep its stored pages resident next to the cast copy (measured with
  ``safe_open``: 1.5x the weights for an 800 MB bfloat16 file loaded as float32); this peaks at the
  loaded weights plus the buffer. ``copied`` reads a tensor as stored into a fresh tensor.
* ``streamed``: the bytes read in bounded chunks into pinned host buffers and copied to the device
  asynchronously (``PinnedStager``), cast there; the host never holds more than the staging buffers.

Safety of the map (what ``torch.UntypedStorage.from_file(shared=False)`` gives: ``mmap(MAP_PRIVATE)``):

* Writes into a mapped tensor (an adapter's ``copy_`` into the metaquery rows, a LoRA merge's
  ``add_``) are copy-on-write: they touch private pages of this process, never the file
  (``tests/tbac_core/loading/test_zero_copy.py`` checks the file's bytes after such writes).
* The file changing on disk while a model is loaded from it: replacing it by a new file
  (download tools, ``save_pretrained``, and every writer of this library write a temporary file and
  rename it) leaves the old contents mapped, which is safe. Rewriting the *same* file in place is
  not: pages not yet read then show the new bytes, and truncating it makes reading the lost pages
  kill the process with SIGBUS. Do not overwrite a checkpoint's files in place while a model loaded
  from them is in use (on Windows the system refuses to, as the file is mapped).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import CheckpointError

# What reading a damaged safetensors file raises (a bad header entry gives KeyError/TypeError/
# ValueError, a short file struct.error or OSError). Out-of-memory and device errors are not here:
# they are not a damaged file and must reach the user as what they are.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error, SafetensorError)
# safetensors dtype codes -> torch dtypes (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
HEADER_LENGTH_BYTES = 8
# Host memory used to stream one file to a GPU: two pinned buffers of this size (one filled from
# the file while the other is copied to the device).
PINNED_CHUNK_BYTES = 64 * 1024**2
# Host buffer through which a CPU cast (bf16 file -> fp32 model) reads each tensor (``cast``).
CAST_CHUNK_BYTES = 16 * 1024**2


def corrupt_file_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Cannot read tensors from {path} ({type(exc).__name__}: {exc}). The file is truncated or "
        f"corrupt: download it again."
    )


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file (absolute byte offsets) and what it is."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int


@dataclass
class SafetensorsFile:
    """One open ``.safetensors`` file: its checked header, a read handle, and (when asked) its map."""

    path: Path
    size: int
    data_start: int
    header: dict
    handle: object
    _map: torch.Tensor | None = field(default=None, repr=False)  # uint8 [size], private mapping

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        try:
            size = path.stat().st_size
            handle = open(path, "rb")  # noqa: SIM115 - kept open across reads, closed by close()
        except OSError as exc:
            raise CheckpointError(f"Cannot open {path}: {exc}") from exc
        try:
            (header_len,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
            if header_len > size - HEADER_LENGTH_BYTES:
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file size ({size} bytes).")
            header = json.loads(handle.read(header_len))
            if not isinstance(header, dict):
                raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
        except CheckpointError:
            handle.close()
            raise
        except READ_ERRORS as exc:
            handle.close()
            raise corrupt_file_error(path, exc) from exc
        return cls(path, size, HEADER_LENGTH_BYTES + header_len, header, handle)

    def close(self) -> None:
        """Close the read handle; tensors already mapped keep the map alive as long as they live."""
        self.handle.close()
        self._map = None

    def __enter__(self) -> SafetensorsFile:  # noqa: PYI034 - a final dataclass
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def entry(self, key: str) -> TensorEntry:
        """The checked header entry of ``key`` (a CheckpointError when it does not fit the file)."""
        try:
            raw = self.header[key]
            begin, end = raw["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(raw["dtype"])
            shape = tuple(int(n) for n in raw["shape"])
        except READ_ERRORS as exc:
            raise corrupt_file_error(self.path, exc) from exc
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {raw['dtype']}.")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if (not isinstance(begin, int) or not isinstance(end, int) or begin < 0 or end - begin != nbytes
                or self.data_start + end > self.size):
            raise CheckpointError(
                f"{self.path}: tensor {key} lies outside the file or has the wrong byte length; the file is "
                f"truncated or corrupt: download it again."
            )
        return TensorEntry(dtype, shape, self.data_start + begin, nbytes)

    # -- the three ways to get a tensor ----------------------------------------------------------
    def copied(self, key: str) -> torch.Tensor:
        """``key`` read into a fresh CPU tensor of its stored dtype (``readinto``, no map)."""
        entry = self.entry(key)
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            try:
                self.handle.seek(entry.begin)
                read = self.handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            except READ_ERRORS as exc:
                raise corrupt_file_error(self.path, exc) from exc
            if read != entry.nbytes:
                raise CheckpointError(f"{self.path}: could not read tensor {key}; the file is truncated.")
        return tensor

    def mapped(self, key: str) -> torch.Tensor:
        """``key`` as a view of the file's private memory map: no copy (see the module notes on safety).

        A tensor whose offset is not a multiple of its element size (a hand-made file; safetensors'
        own writer aligns them) cannot be viewed in place and is copied instead.
        """
        entry = self.entry(key)
        if entry.begin % entry.dtype.itemsize:
            return self.copied(key)
        file_bytes = self._file_map()
        return file_bytes[entry.begin: entry.begin + entry.nbytes].view(entry.dtype).view(entry.shape)

    def cast(self, key: str, dtype: torch.dtype, staging: torch.Tensor, input_major: bool = False) -> torch.Tensor:
        """``key`` read into a new CPU tensor of ``dtype``, through the uint8 buffer ``staging`` chunk by chunk.

        Why not ``copied(key).to(dtype)``: glibc keeps each freed stored-dtype copy as a heap hole that
        the next, larger cast result does not fit (measured: 16 bf16 tensors of 4 MiB cast to fp32 grew
        RSS by 192 MiB instead of 128). One reused buffer bounds the extra memory to its size.
        ``input_major``: a weight [out, in, ...] is stored with memory [in, out] (``modeling.weight_layout``),
        transposed on the way in rather than re-stored after loading (which leaves heap holes too).
        """
        entry = self.entry(key)
        if input_major:  # [out, in, ...] whose memory is [in, out]: filled row by row of the stored order
            out_features = entry.shape[0]
            in_features = entry.nbytes // entry.dtype.itemsize // out_features
            target = torch.empty(in_features, out_features, dtype=dtype).t().view(entry.shape)
            rows = target.view(out_features, in_features)
        else:
            target = torch.empty(entry.shape, dtype=dtype)
            rows = target.view(-1, 1)  # element by element
        row_bytes = rows.shape[1] * entry.dtype.itemsize
        per_chunk = max(1, staging.numel() // row_bytes)
        done = 0
        while done < rows.shape[0]:
            count = min(per_chunk, rows.shape[0] - done)
            chunk = staging[: count * row_bytes]
            self.read_into(entry.begin + done * row_bytes, chunk, key)
            rows[done: done + count].copy_(chunk.view(entry.dtype).view(count, -1))
            done += count
        return target

    def streamed(self, key: str, device: torch.device, stager: PinnedStager) -> torch.Tensor:
        """``key`` in its stored dtype on ``device``, sent through ``stager``'s pinned chunks."""
        entry = self.entry(key)
        target = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        stager.copy_file_range(self, entry, target.view(-1).view(torch.uint8), key)
        return target

    def read_into(self, offset: int, out: torch.Tensor, key: str) -> None:
        """Fill the uint8 CPU tensor ``out`` with the file's bytes from ``offset`` (one chunk)."""
        try:
            self.handle.seek(offset)
            read = self.handle.readinto(memoryview(out.numpy()))
        except READ_ERRORS as exc:
            raise corrupt_file_error(self.path, exc) from exc
        if read != out.numel():
            raise CheckpointError(f"{self.path}: could not read tensor {key}; the file is truncated.")

    def _file_map(self) -> torch.Tensor:
        if self._map is None:
            self._map = map_file_private(self.path, self.size)
        return self._map


def map_file_private(path: Path, size: int) -> torch.Tensor:
    """The first ``size`` bytes of ``path`` as a uint8 tensor over a private memory map (no copy).

    ``shared=False`` is ``MAP_PRIVATE``: writes are copy-on-write and never reach the file (see the
    module notes on safety). Shared by the ``.gguf`` reader.
    """
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as exc:  # the file shrank since its size was read
        raise corrupt_file_error(path, exc) from exc
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class PinnedStager:
    """Two pinned host buffers of ``chunk_bytes`` that carry file bytes to a CUDA device.

    While chunk k is copied host -> device (asynchronously, on the current stream), chunk k+1 is
    read from the file into the other buffer; a buffer is refilled only after the event recorded
    behind its last copy has completed. Host memory used: 2 x ``chunk_bytes`` whatever the model's
    size. Untested on a GPU when written (no GPU was available); the CPU suite checks only that it
    is not used without CUDA.
    """

    def __init__(self, device: torch.device, chunk_bytes: int = PINNED_CHUNK_BYTES):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"PinnedStager needs an available CUDA device, got {device}")
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.buffers: list[torch.Tensor] = []  # allocated on the first copy
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def copy_file_range(self, file: SafetensorsFile, entry: TensorEntry, target: torch.Tensor, key: str) -> None:
        """Copy ``entry``'s bytes of ``file`` into the uint8 device tensor ``target`` [nbytes]."""
        if not self.buffers:
            self.buffers = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done = 0
        while done < entry.nbytes:
            count = min(self.chunk_bytes, entry.nbytes - done)
            slot = self.turn
            if self.events[slot] is not None:
                self.events[slot].synchronize()  # the previous copy out of this buffer has finished
            chunk = self.buffers[slot][:count]
            file.read_into(entry.begin + done, chunk, key)
            target[done: done + count].copy_(chunk, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.events[slot] = event
            self.turn = 1 - slot
            done += count

    def finish(self) -> None:
        """Wait for every queued copy (the buffers may then be freed or refilled)."""
        for event in self.events:
            if event is not None:
                event.synchronize()
