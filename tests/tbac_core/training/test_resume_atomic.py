"""Resuming is all or nothing: a damaged or failing resume leaves every trained tensor as it was."""
from __future__ import annotations

import math

import pytest
import torch
from training_support import config, load

from tbac_core.errors import AdapterError
from tbac_core.training import Trainer


@pytest.fixture(scope="module")
def trainer(checkpoint_dir, data_dir, tmp_path_factory):
    """Trains metaqueries, connector and DiT LoRA: every kind of resume write."""
    return Trainer(load(checkpoint_dir), config(tmp_path_factory.mktemp("run"), data_dir, dit_mode="lora",
                                                lora_rank=2, max_steps=1))


def trained(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.parts.state_dict().items()}


def assert_same(trainer, before) -> None:
    after = trainer.parts.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def _saved(trainer):
    tensors = {k: v + 1.0 for k, v in trainer.parts.state_dict().items()}  # differs from the live values
    return tensors, trainer.parts.adapter_config()


@pytest.mark.parametrize("damage, message", [
    (lambda t: {k: v for k, v in t.items() if not k.startswith("connector.0.")}, "connector tensors do not match"),
    (lambda t: {k: (torch.full_like(v, math.nan) if k.startswith("dit_lora.") else v) for k, v in t.items()},
     "not finite"),
    (lambda t: {k: (v[:, :1] if ".lora_A." in k else v) for k, v in t.items()}, "dit_lora tensors do not match"),
    (lambda t: {k: v for k, v in t.items() if k != "metaqueries.rows"}, "metaqueries tensors do not match"),
])
def test_a_damaged_checkpoint_is_refused_before_any_write(trainer, damage, message):
    tensors, adapter_config = _saved(trainer)
    before = trained(trainer)
    with pytest.raises(AdapterError, match=message):
        trainer.parts.load_state_dict(damage(tensors), adapter_config, "run/checkpoint-1")
    assert_same(trainer, before)


def test_a_failing_write_restores_what_was_written(trainer, monkeypatch):
    """Metaquery rows and connector are written, then the LoRA write fails: both come back."""
    import peft

    def fail(*args, **kwargs):
        raise RuntimeError("injected: out of memory")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", fail)
    tensors, adapter_config = _saved(trainer)
    before = trained(trainer)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.parts.load_state_dict(tensors, adapter_config, "run/checkpoint-1")
    assert_same(trainer, before)
    monkeypatch.undo()
    trainer.parts.load_state_dict(tensors, adapter_config, "run/checkpoint-1")  # the same tensors do load
    assert all(torch.equal(v, tensors[k]) for k, v in trainer.parts.state_dict().items())
