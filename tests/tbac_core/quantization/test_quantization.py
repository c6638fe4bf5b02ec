"""fp8 and GGUF: block formats against the gguf package, round trips on the tiny fixture, refusals."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tbac_core.errors import CheckpointError
from tbac_core.loading import load_model
from tbac_core.loading.checkpoint import CheckpointFiles
from tbac_core.pipeline.tbac_pipeline import TBACPipeline
from tbac_core.quantization import FP8Linear, GGUFLinear, quantize_checkpoint
from tbac_core.quantization.ggml import (
    BLOCK_FORMATS,
    dequantize_blocks,
    quantize_blocks,
)

gguf = pytest.importorskip("gguf")
DIT_Q = "transformer_blocks.0.attn1.to_q.weight"
MLLM_Q = "model.layers.0.mlp.gate_proj.weight"


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_torch_dequantize_matches_the_gguf_package(name):
    fmt = BLOCK_FORMATS[name]
    weight = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01
    raw = quantize_blocks(weight, fmt)
    reference = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type))
    assert torch.equal(dequantize_blocks(raw, fmt, 512), torch.from_numpy(reference.copy()))


def test_q8_0_bytes_match_the_gguf_package_quantizer():
    weight = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    expected = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize_blocks(weight, BLOCK_FORMATS["q8_0"]).numpy(), expected)


@pytest.fixture(scope="module")
def quantized(checkpoint_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: quantize_checkpoint(checkpoint_dir, root / fmt, fmt) for fmt in ("fp8", "q8_0", "q4_k", "q5_k")}


def _load(folder, fixture_root, **kwargs):
    return load_model(folder, device="cpu", dtype="float32", models_dirs=[fixture_root], **kwargs)


def _layer(model, component: str, key: str):
    root = model.dit.transformer if component == "dit" else model.mllm
    name = key[: -len(".weight")]
    for candidate in (name, name.replace("model.layers", "model.language_model.layers"),
                      name.replace("model.layers", "language_model.layers")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise AssertionError(f"no module {name}")


def _originals(checkpoint_dir):
    files = CheckpointFiles.open(checkpoint_dir)
    return files.load_component("dit", torch.float32), files.load_component("mllm", torch.float32)


def test_fp8_round_trip_within_the_e4m3_bound(quantized, checkpoint_dir, fixture_root):
    model = _load(quantized["fp8"], fixture_root)
    dit_state, mllm_state = _originals(checkpoint_dir)
    for component, key, original in (("dit", DIT_Q, dit_state[DIT_Q]), ("mllm", MLLM_Q, mllm_state[MLLM_Q])):
        layer = _layer(model, component, key)
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
        restored = layer.dequantized_weight()
        scale = float(layer.scale_weight)
        # 3 mantissa bits: relative error <= 2^-4 for normal values; below 2^-6 * scale the subnormal
        # spacing (2^-9 * scale) bounds the absolute error by half of it.
        bound = torch.maximum(original.abs() * 2**-4, torch.full_like(original, 2**-10 * scale)) * 1.001
        assert bool(((restored - original).abs() <= bound).all())
    assert isinstance(model.dit.transformer.transformer_blocks[0].attn1.to_q, FP8Linear)
    assert not isinstance(model.dit.connector, FP8Linear)  # the connector, VAE, norms, embeddings stay
    assert model.mllm.get_input_embeddings().weight.dtype == torch.float32


def test_q8_0_round_trip_within_half_a_step_per_block(quantized, checkpoint_dir, fixture_root):
    model = _load(quantized["q8_0"], fixture_root)
    dit_state, _ = _originals(checkpoint_dir)
    layer = _layer(model, "dit", DIT_Q)
    assert isinstance(layer, GGUFLinear) and layer.format.name == "q8_0"
    original = dit_state[DIT_Q].reshape(-1, 32)
    restored = layer.dequantized_weight().reshape(-1, 32)
    step = original.abs().amax(dim=1, keepdim=True) / 127  # the block scale d
    # d/2 rounding, plus d's own rounding to float16 (2^-11 relative) times |q| <= 127.
    assert bool(((restored - original).abs() <= step * (0.5 + 127 * 2**-11)).all())


@pytest.mark.parametrize("fmt", ["fp8", "q8_0", "q4_k", "q5_k"])
def test_quantized_checkpoints_generate_finite_images(quantized, fixture_root, fmt):
    model = _load(quantized[fmt], fixture_root)
    out = TBACPipeline(model).generate("a red circle", width=64, height=64, steps=2, seed=3)
    assert torch.isfinite(out.tensors).all() and out.tensors.shape == (1, 64, 64, 3)


def test_quantize_while_loading(checkpoint_dir):
    model = load_model(checkpoint_dir, device="cpu", dtype="bfloat16", quantization="q8_0")
    assert isinstance(model.dit.transformer.transformer_blocks[0].attn2.to_k, GGUFLinear)
    assert isinstance(model.dit.transformer.transformer_blocks[0].attn2.to_k.bias, torch.Tensor)


def test_truncated_gguf_is_refused_naming_the_file(quantized, fixture_root, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(quantized["q8_0"], folder)
    path = folder / "model.gguf"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.gguf.*truncated"):
        _load(folder, fixture_root)


def test_truncated_fp8_safetensors_is_refused(quantized, fixture_root, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(quantized["fp8"], folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(folder, fixture_root)


def test_gguf_of_another_model_is_refused_naming_tensor_and_shapes(checkpoint_dir, fixture_root, tmp_path):
    """A GGUF whose layer has another shape (another model / config) fails before any weight is used."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    shutil.copytree(checkpoint_dir, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.transformer." + DIT_Q] = torch.randn(16, 64)
    save_file(tensors, str(source / "model.safetensors"))
    folder = quantize_checkpoint(source, tmp_path / "other", "q8_0")  # quantize reads headers, not the model
    with pytest.raises(CheckpointError, match=r"model\.gguf.*to_q\.weight.*\(16, 64\).*\(32, 32\)"):
        _load(folder, fixture_root)


def test_gguf_of_another_architecture_is_refused(quantized, fixture_root, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(quantized["q8_0"], folder, ignore=shutil.ignore_patterns("model.gguf"))
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match=r"model\.gguf.*architecture 'llama'"):
        _load(folder, fixture_root)


def test_quantize_refuses_a_non_empty_output(checkpoint_dir, tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(checkpoint_dir, tmp_path, "fp8")


def test_gguf_tensors_are_views_of_the_file_and_writes_never_reach_it(quantized, fixture_root, tmp_path):
    """Loaded in its stored dtype, a GGUF is mapped, not copied (a copy held every tensor twice:
    15.1 GiB of peak RSS for the 7.5 GiB Q8_0 file of the real architecture); the map is private."""
    import hashlib

    folder = tmp_path / "q8_0"
    shutil.copytree(quantized["q8_0"], folder)
    path = folder / "model.gguf"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = _load(folder, fixture_root)  # the fixture is float32: plain tensors need no cast
    layer = _layer(model, "dit", DIT_Q)
    embedding = model.mllm.get_input_embeddings().weight
    for tensor in (layer.weight, embedding):
        assert tensor.untyped_storage().nbytes() == path.stat().st_size  # a view of the whole-file map
    reference = _load(quantized["q8_0"], fixture_root)
    assert torch.equal(embedding, reference.mllm.get_input_embeddings().weight)
    with torch.no_grad():
        embedding.add_(1.0)
        layer.weight.zero_()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
