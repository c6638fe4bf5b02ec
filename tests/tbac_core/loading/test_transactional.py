"""Mutating operations are all or nothing: a refused or failing change leaves the model bit for bit as it was.

Each case builds an adapter that passes the early checks and fails late (or injects a failure
after some tensors were written) and compares every weight and the identity with a snapshot.
"""
from __future__ import annotations

import math

import pytest
import torch

from tbac_core.errors import AdapterError, CheckpointError
from tbac_core.loading import adapters, load_model
from tbac_core.loading.adapters import (
    apply_adapter,
    base_record,
    lora_scale,
    write_adapter,
)

LORA = {"rank": 2, "alpha": 4.0, "use_rslora": False}
TARGETS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_v")


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(checkpoint_dir, device="cpu", dtype="float32")


def snapshot(model) -> dict:
    tensors = {}
    for part in ("mllm", "vae"):
        tensors.update({f"{part}.{k}": v.detach().clone() for k, v in getattr(model, part).state_dict().items()})
    tensors.update({f"dit.{k}": v.detach().clone() for k, v in model.dit.state_dict().items()})
    return {"tensors": tensors, "identity": model.identity}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["identity"] == before["identity"]
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert changed == []


def lora_tensors(model, rank=2, targets=TARGETS, value=0.05) -> dict:
    modules = dict(model.dit.transformer.named_modules())
    out = {}
    for i, name in enumerate(targets):
        linear = modules[name]
        gen = torch.Generator().manual_seed(i)
        out[f"dit_lora.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) * value
        out[f"dit_lora.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen) * value
    return out


def good_parts(model) -> dict:
    """Metaquery rows, a full connector and LoRA pairs: the early parts of a write are really written."""
    rows = torch.randn(model.config.num_metaqueries, model.identity.hidden_size)
    connector = {f"connector.{k}": v + 0.5 for k, v in model.dit.connector.state_dict().items()}
    return {"metaqueries.rows": rows, **connector, **lora_tensors(model)}


def make(tmp_path, model, tensors, **config) -> str:
    config = {"base": base_record(model), "parts": {"dit": "lora"}, "lora": dict(LORA), **config}
    folder = tmp_path / "adapter"
    write_adapter(folder, tensors, config)
    path = folder / "adapter_config.json"  # JSON writers refuse NaN; Python's reader takes it
    path.write_text(path.read_text().replace('"__NaN__"', "NaN"))
    return folder


def _drop(tensors, key):
    return {k: v for k, v in tensors.items() if k != key}


BROKEN = {
    "incomplete LoRA pair": (lambda m: _drop(good_parts(m), f"dit_lora.{TARGETS[1]}.lora_B.weight"), {},
                             "incomplete LoRA pair"),
    "no lora section": (good_parts, {"lora": None}, "no 'lora' section"),
    "rank 0": (good_parts, {"lora": {**LORA, "rank": 0}}, "rank must be an integer"),
    "rank as text": (good_parts, {"lora": {**LORA, "rank": "2"}}, "rank must be an integer"),
    "rank differs from the matrices": (good_parts, {"lora": {**LORA, "rank": 3}}, "with rank 3 needs"),
    "alpha NaN": (good_parts, {"lora": {**LORA, "alpha": "__NaN__"}}, "alpha must be a finite number"),
    "alpha as list": (good_parts, {"lora": {**LORA, "alpha": [1]}}, "alpha must be a finite number"),
    "NaN LoRA matrix": (lambda m: {**good_parts(m), f"dit_lora.{TARGETS[1]}.lora_A.weight":
                                   torch.full((2, 32), math.nan)}, {}, "not finite"),
    "inf metaquery rows": (lambda m: {**good_parts(m), "metaqueries.rows":
                                      torch.full((m.config.num_metaqueries, m.identity.hidden_size), math.inf)},
                           {}, "not finite"),
    "integer tensor": (lambda m: {**good_parts(m), f"dit_lora.{TARGETS[1]}.lora_A.weight":
                                  torch.ones(2, 32, dtype=torch.int32)}, {}, "dtype torch.int32"),
    "bad LoRA key": (lambda m: {**good_parts(m), "dit_lora.transformer_blocks.0.attn1.to_q.lora_C.weight":
                                torch.ones(2, 32)}, {}, "neither"),
    "LoRA on a non-linear": (lambda m: {**good_parts(m), "dit_lora.transformer_blocks.0.lora_A.weight":
                                        torch.ones(2, 32), "dit_lora.transformer_blocks.0.lora_B.weight":
                                        torch.ones(32, 2)}, {}, "not a Linear layer"),
    "mis-shaped connector": (lambda m: {**good_parts(m), "connector.0.weight": torch.ones(3, 3)}, {}, "mis-shaped"),
    "version text": (good_parts, {"version": "one"}, "'version' must be a whole number"),
    "parts a list": (good_parts, {"parts": ["lora"]}, "'parts' must be an object"),
    "base a string": (good_parts, {"base": "checkpoint"}, "'base' must be an object"),
    "unknown dit mode": (good_parts, {"parts": {"dit": "half"}}, "parts.dit must be one of"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_refused_adapter_leaves_the_model_bit_identical(case, model, tmp_path):
    tensors, config, message = BROKEN[case]
    folder = make(tmp_path, model, tensors(model), **config)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=message):
        apply_adapter(model, folder)
    assert_unchanged(model, before)


@pytest.mark.parametrize("failure", [RuntimeError("injected: out of memory"), KeyboardInterrupt()])
def test_a_failure_after_writing_restores_every_tensor(failure, model, tmp_path, monkeypatch):
    """Rows and connector are written, the first LoRA pair merged, then the merge fails."""
    folder = make(tmp_path, model, good_parts(model))
    real_add = adapters._add_lora

    def add_then_fail(pairs, scale):
        real_add(pairs[:1], scale)
        assert not torch.equal(pairs[0][0].weight, before["tensors"][f"dit.transformer.{TARGETS[0]}.weight"])
        raise failure

    monkeypatch.setattr(adapters, "_add_lora", add_then_fail)
    before = snapshot(model)
    with pytest.raises(type(failure)):
        apply_adapter(model, folder)
    assert_unchanged(model, before)


def test_an_overflowing_merge_is_refused_and_restored(checkpoint_dir, tmp_path):
    """A real late failure: float16 weights overflow to inf after the merge; every write is undone."""
    half = load_model(checkpoint_dir, device="cpu", dtype="float16")
    folder = make(tmp_path, half, {**good_parts(half), **lora_tensors(half, value=2000.0)})
    before = snapshot(half)
    with pytest.raises(AdapterError, match="infinite"):
        apply_adapter(half, folder)
    assert_unchanged(half, before)


def test_a_good_adapter_changes_exactly_its_tensors_and_the_identity(checkpoint_dir, tmp_path):
    fresh = load_model(checkpoint_dir, device="cpu", dtype="float32")
    tensors = good_parts(fresh)
    folder = make(tmp_path, fresh, tensors)
    before = snapshot(fresh)
    apply_adapter(fresh, folder)
    after = snapshot(fresh)
    assert after["identity"].fingerprint != before["identity"].fingerprint
    assert after["identity"].name == "checkpoint+adapter"
    changed = {k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])}
    expected = {"mllm." + next(k for k in before["tensors"] if "embed_tokens" in k)[5:]}
    expected |= {f"dit.connector.{k}" for k in fresh.dit.connector.state_dict()}
    expected |= {f"dit.transformer.{name}.weight" for name in TARGETS}
    assert changed == expected
    scale = lora_scale(LORA)
    for name in TARGETS:
        a, b = tensors[f"dit_lora.{name}.lora_A.weight"], tensors[f"dit_lora.{name}.lora_B.weight"]
        key = f"dit.transformer.{name}.weight"
        assert torch.equal(after["tensors"][key], before["tensors"][key] + (b @ a) * scale)
    embedding = fresh.mllm.get_input_embeddings().weight
    rows = embedding[fresh.base_vocab: fresh.base_vocab + fresh.config.num_metaqueries]
    assert torch.equal(rows, tensors["metaqueries.rows"])
    with pytest.raises(AdapterError, match="already has an adapter applied"):
        apply_adapter(fresh, folder)  # refused: the identity changed


def test_adapter_errors_are_checkpoint_errors():
    assert issubclass(AdapterError, CheckpointError)
