"""Memory modes and the conditioning cache of TBACPipeline."""
from __future__ import annotations

import pytest
import torch

from tbac_core.errors import InvalidParameterError
from tbac_core.params import MEMORY_MODES
from tbac_core.pipeline.placement import MemoryModePlacement
from tbac_core.pipeline.tbac_pipeline import TBACPipeline


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_every_memory_mode_gives_the_same_image(pipe, mode):
    reference = pipe.generate("a red cat", steps=2, seed=1).latents
    other = TBACPipeline(pipe.model, memory=mode, device="cpu")
    torch.testing.assert_close(other.generate("a red cat", steps=2, seed=1).latents, reference, atol=0, rtol=0)


@pytest.mark.parametrize("mode, homes", [
    ("full", {"mllm": "cuda", "dit": "cuda", "vae": "cuda"}),
    ("offload-mllm", {"mllm": "cpu", "dit": "cuda", "vae": "cuda"}),
    ("sequential", {"mllm": "cpu", "dit": "cpu", "vae": "cpu"}),
])
def test_where_parts_rest(mode, homes):
    placement = MemoryModePlacement.__new__(MemoryModePlacement)
    placement.mode, placement.device, placement.offload_device = mode, torch.device("cuda"), torch.device("cpu")
    assert {part: placement._home(part).type for part in homes} == homes


def test_unknown_mode_refused(pipe):
    with pytest.raises(InvalidParameterError, match="offload-mllm"):
        TBACPipeline(pipe.model, memory="lowvram")


def test_conditioning_cache_reuses_and_is_bounded(pipe, monkeypatch):
    calls = []
    original = pipe.model.encode
    monkeypatch.setattr(pipe.model, "encode", lambda *a, **k: calls.append(a) or original(*a, **k))
    cached = TBACPipeline(pipe.model, cache_size=2, device="cpu")
    first = cached.encode("a cat")
    assert cached.encode("a cat") is first and len(calls) == 1
    cached.encode("a dog")
    cached.encode("a bird")
    assert len(cached._cache) == 2
    cached.encode("a cat")
    assert len(calls) == 4  # evicted, encoded again
    uncached = TBACPipeline(pipe.model, cache_size=0, device="cpu")
    uncached.encode("a cat")
    uncached.encode("a cat")
    assert len(calls) == 6 and len(uncached._cache) == 0


def test_compile_switch_compiles_the_dit_blocks(checkpoint_dir):
    from tbac_core import load_model

    model = load_model(checkpoint_dir, device="cpu", dtype="fp32")
    TBACPipeline(model, compile_dit=True, device="cpu")
    assert all(block._compiled_call_impl is not None for block in model.dit.transformer.transformer_blocks)
