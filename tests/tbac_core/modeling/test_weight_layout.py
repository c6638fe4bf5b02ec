"""Input-major float32 DiT weights on the CPU: same parameters and keys, memory [in, out], same outputs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tbac_core.loading import load_model
from tbac_core.loading.safetensors_reader import SafetensorsFile
from tbac_core.modeling.dit import mask_to_bias
from tbac_core.modeling.weight_layout import input_major_keys, is_input_major


def test_the_reader_transposes_on_the_way_in(tmp_path):
    generator = torch.Generator().manual_seed(0)
    stored = {"linear": torch.randn(48, 20, generator=generator),
              "conv": torch.randn(24, 10, 1, 1, generator=generator),
              "bf16": torch.randn(16, 8, generator=generator).to(torch.bfloat16)}
    save_file(stored, str(tmp_path / "w.safetensors"))
    staging = torch.empty(3 * 20 * 4 + 7, dtype=torch.uint8)  # a few rows per chunk: many chunks, a ragged end
    with SafetensorsFile.open(tmp_path / "w.safetensors") as file:
        for key, tensor in stored.items():
            loaded = file.cast(key, torch.float32, staging, input_major=True)
            assert loaded.shape == tensor.shape and is_input_major(loaded)
            assert torch.equal(loaded, tensor.float())
            plain = file.cast(key, torch.float32, staging)
            assert plain.is_contiguous() and torch.equal(plain, tensor.float())


@pytest.fixture(scope="module")
def fp32_model(checkpoint_dir):
    return load_model(checkpoint_dir, device="cpu", dtype="fp32")


def test_float32_cpu_dit_linears_are_input_major(fp32_model, checkpoint_dir):
    transformer = fp32_model.dit.transformer
    keys = input_major_keys(transformer)
    weights = transformer.state_dict()
    assert any(".ff.conv_inverted." in key for key in keys) and any(".attn1.to_q." in key for key in keys)
    assert all(is_input_major(weights[key]) for key in keys)
    assert all(weights[key].is_contiguous() for key in weights if key not in keys)  # norms, biases, patch conv
    bf16 = load_model(checkpoint_dir, device="cpu", dtype="bf16").dit.transformer.state_dict()
    assert all(bf16[key].is_contiguous() for key in keys)  # bfloat16 products are not faster input-major
    # Same values as the file holds (the bf16 fixture DiT cast to float32).
    assert all(torch.equal(weights[key], bf16[key].float()) for key in keys)


def test_input_major_dit_gives_the_contiguous_dit_output(fp32_model):
    dit = fp32_model.dit
    generator = torch.Generator().manual_seed(1)
    rows, tokens = 2, 5
    conditions = [dit.transformer.caption_norm(torch.randn(rows, tokens, dit.transformer.config.cross_attention_dim,
                                                            generator=generator)) for _ in range(dit.num_blocks)]
    mask = mask_to_bias(torch.ones(rows, tokens), dit.dtype)
    latents = torch.randn(rows, dit.transformer.config.in_channels, 8, 8, generator=generator)
    timestep = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        input_major = dit(latents, timestep, dit.precompute_conditions(conditions, mask))
        originals = {param: param.data for param in dit.transformer.parameters()}
        try:
            for param in originals:
                param.data = param.data.contiguous()
            contiguous = dit(latents, timestep, dit.precompute_conditions(conditions, mask))
        finally:
            for param, data in originals.items():
                param.data = data
    assert is_input_major(dit.transformer.transformer_blocks[0].attn1.to_q.weight)
    torch.testing.assert_close(input_major, contiguous, atol=1e-5, rtol=1e-5)


def test_training_stores_the_dit_row_major_again(checkpoint_dir):
    """FSDP shards flat views of parameters and optimizer moments take their layout: training undoes it."""
    from tbac_core.training.parts import TrainableParts

    model = load_model(checkpoint_dir, device="cpu", dtype="fp32")
    before = {key: value.clone() for key, value in model.dit.transformer.state_dict().items()}
    assert not all(value.is_contiguous() for value in model.dit.transformer.parameters())
    TrainableParts(model, dit_mode="full")
    after = model.dit.transformer.state_dict()
    assert all(value.is_contiguous() for value in model.dit.transformer.parameters())
    assert all(torch.equal(after[key], value) for key, value in before.items())
