"""Modules built for loading get meta parameters and run no weight initialiser."""
from transformers import Qwen2_5_VLForConditionalGeneration

from tbac_core.modeling.mllm import build_mllm


def test_mllm_is_built_on_meta_without_running_init_weights(monkeypatch, fixture_root):
    from tbac_core.io.jsonfile import read_json

    calls = []
    original = Qwen2_5_VLForConditionalGeneration._init_weights
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "_init_weights",
                        lambda self, module: calls.append(type(module).__name__) or original(self, module))
    config = read_json(fixture_root / "tiny-Qwen2.5-VL-Instruct" / "config.json")
    model, base_vocab = build_mllm(config, config["vocab_size"] + 66)
    assert calls == []  # initialising weights that the checkpoint replaces is wasted time
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # Buffers are real: the rotary frequencies are computed, not left on meta.
    assert all(b.device.type == "cpu" for b in model.buffers())
