"""Zero-copy loading: mapped tensors really come from the file, equal the copied ones, and never write to it."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tbac_core.errors import CheckpointError
from tbac_core.loading import load_model
from tbac_core.loading.checkpoint import COMPONENT_PREFIXES, CheckpointFiles
from tbac_core.loading.safetensors_reader import (
    CAST_CHUNK_BYTES,
    PinnedStager,
    SafetensorsFile,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and status")
MiB = 1024**2


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapping ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path.resolve():
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    return any(begin <= start and stop <= end for begin, end in ranges)


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_checkpoint(tmp_path: Path, fixture_root: Path) -> Path:
    """The tiny checkpoint and its component folders (configs and tokenizer only) under ``tmp_path``."""
    for folder in ("checkpoint", "tiny-Qwen2.5-VL-Instruct", "tiny-Sana_diffusers"):
        shutil.copytree(fixture_root / folder, tmp_path / folder,
                        ignore=None if folder == "checkpoint" else shutil.ignore_patterns("*.safetensors"))
    return tmp_path / "checkpoint"


@linux_only
@pytest.mark.parametrize("dtype, mapped_part, cast_part", [
    (torch.float32, "mllm", "dit"),   # MLLM stored fp32, DiT stored bf16
    (torch.bfloat16, "dit", "mllm"),
])
def test_stored_dtype_is_mapped_and_casts_are_copies(checkpoint_dir, dtype, mapped_part, cast_part):
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    model = load_model(checkpoint_dir, device="cpu", dtype=name)
    ranges = file_mappings(checkpoint_dir / "model.safetensors")
    assert ranges, "the checkpoint file is not mapped"
    parts = {"mllm": model.mllm, "dit": model.dit.transformer}
    mapped = [(n, p) for n, p in parts[mapped_part].named_parameters()]
    assert mapped and all(inside(p, ranges) for _, p in mapped), [n for n, p in mapped if not inside(p, ranges)][:3]
    assert not any(inside(p, ranges) for p in parts[cast_part].parameters())
    assert {p.dtype for p in parts[cast_part].parameters()} == {dtype}


def test_mapped_and_cast_equal_the_reference_reader(checkpoint_dir):
    """Every way of loading gives safetensors' own tensors, cast as ``.to(dtype)`` would."""
    reference = load_file(str(checkpoint_dir / "model.safetensors"))
    files = CheckpointFiles.open(checkpoint_dir)
    for component, prefix in COMPONENT_PREFIXES.items():
        for dtype in (None, torch.float32, torch.bfloat16):
            mapped = files.load_component(component, dtype, "cpu")
            copied = files.load_component(component, dtype, "cpu", zero_copy=False)
            assert mapped.keys() == copied.keys()
            for key, tensor in mapped.items():
                expected = reference[prefix + key].to(dtype or reference[prefix + key].dtype)
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), (component, key)
                assert torch.equal(copied[key], expected), (component, key)


def test_writes_into_a_loaded_model_never_reach_the_file(tmp_path, fixture_root):
    """Adapters copy rows into the embedding and LoRA merges add into weights in place: copy-on-write."""
    checkpoint = copy_checkpoint(tmp_path, fixture_root)
    weights = checkpoint / "model.safetensors"
    before = sha256(weights)
    model = load_model(checkpoint, device="cpu", dtype="fp32")
    embedding = model.mllm.get_input_embeddings().weight  # mapped (stored fp32)
    original_rows = embedding[model.base_vocab: model.base_vocab + 4].clone()
    with torch.no_grad():
        embedding[model.base_vocab: model.base_vocab + 4].copy_(torch.full_like(original_rows, 7.0))
        for param in model.mllm.parameters():
            param.add_(1.0)
    assert torch.all(embedding[model.base_vocab: model.base_vocab + 4] == 8.0)
    assert sha256(weights) == before
    fresh = load_model(checkpoint, device="cpu", dtype="fp32")
    assert torch.equal(fresh.mllm.get_input_embeddings().weight[fresh.base_vocab: fresh.base_vocab + 4],
                       original_rows)


def _write_big_checkpoint(path: Path, tensors: int, tensor_bytes: int, dtype=torch.float32) -> int:
    generator = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(tensor_bytes // dtype.itemsize, generator=generator).to(dtype)
             for i in range(tensors)}
    save_file(state, str(path))
    return tensors * tensor_bytes


@linux_only
def test_zero_copy_adds_no_anonymous_memory_and_casts_stay_bounded(tmp_path):
    """64 MiB of bf16: mapping adds ~0 anonymous memory (even once every page is read); casting to fp32
    peaks near the 128 MiB result plus one tensor, not the result plus the whole file (as a map would)."""
    path = tmp_path / "big.safetensors"
    total = _write_big_checkpoint(path, tensors=16, tensor_bytes=4 * MiB, dtype=torch.bfloat16)
    keys = [f"w{i}" for i in range(16)]

    anon_before, file_before = status_kib("RssAnon"), status_kib("RssFile")
    with SafetensorsFile.open(path) as file:
        mapped = [file.mapped(key) for key in keys]
    for tensor in mapped:
        tensor.sum()  # read every page through the map
    anon_growth = (status_kib("RssAnon") - anon_before) * 1024
    file_growth = (status_kib("RssFile") - file_before) * 1024
    assert anon_growth < 0.1 * total, f"mapping grew anonymous memory by {anon_growth / MiB:.1f} MiB"
    assert file_growth > 0.9 * total, f"only {file_growth / MiB:.1f} MiB of the file became resident"
    del mapped

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    peak_before = status_kib("VmHWM") * 1024
    with SafetensorsFile.open(path) as file:
        staging = torch.empty(CAST_CHUNK_BYTES, dtype=torch.uint8)
        cast = [file.cast(key, torch.float32, staging) for key in keys]
    peak_growth = status_kib("VmHWM") * 1024 - peak_before
    # result 128 MiB + the 16 MiB buffer + 4 MiB slack; a map would add 64 MiB, copy-then-cast ~64 MiB too
    assert peak_growth <= 2 * total + CAST_CHUNK_BYTES + 4 * MiB, f"casting peaked {peak_growth / MiB:.1f} MiB higher"
    expected = load_file(str(path))
    assert all(torch.equal(tensor, expected[key].float()) for key, tensor in zip(keys, cast))


def test_misaligned_tensor_is_copied_not_viewed(tmp_path):
    """A hand-made file with a float32 tensor at an odd offset still loads (copied), with the right values."""
    values = torch.arange(6, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x05" + values.numpy().tobytes())
    with SafetensorsFile.open(path) as file:
        assert torch.equal(file.mapped("b"), values.view(2, 3))
        assert int(file.mapped("a")[0]) == 5


def test_file_that_shrank_after_opening_is_a_clear_error(tmp_path):
    path = tmp_path / "shrinks.safetensors"
    _write_big_checkpoint(path, tensors=2, tensor_bytes=4096)
    with SafetensorsFile.open(path) as file:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="shrinks.safetensors.*truncated or corrupt"):
            file.mapped("w1")


def test_wrong_byte_length_in_a_header_is_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(12))
    with SafetensorsFile.open(path) as file, pytest.raises(CheckpointError, match="wrong byte length"):
        file.mapped("a")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_pinned_stager_needs_cuda():
    with pytest.raises(ValueError, match="needs an available CUDA device"):
        PinnedStager(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_equals_cpu_loading(checkpoint_dir):
    files = CheckpointFiles.open(checkpoint_dir)
    for component in COMPONENT_PREFIXES:
        for dtype in (torch.float32, torch.bfloat16):
            on_gpu = files.load_component(component, dtype, "cuda")
            on_cpu = files.load_component(component, dtype, "cpu")
            for key, tensor in on_gpu.items():
                assert tensor.device.type == "cuda" and torch.equal(tensor.cpu(), on_cpu[key]), (component, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_in_small_chunks(tmp_path):
    path = tmp_path / "chunks.safetensors"
    _write_big_checkpoint(path, tensors=3, tensor_bytes=10_000)
    stager = PinnedStager(torch.device("cuda"), chunk_bytes=4096)  # each tensor takes 3 chunks
    with SafetensorsFile.open(path) as file:
        streamed = [file.streamed(f"w{i}", torch.device("cuda"), stager) for i in range(3)]
        copied = [file.copied(f"w{i}") for i in range(3)]
    stager.finish()
    for a, b in zip(streamed, copied):
        assert torch.equal(a.cpu(), b)
