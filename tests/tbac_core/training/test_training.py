"""Ladder-side tuning: frozen parts stay bit-identical, the loss falls, resume, LoRA, adapters, guard."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from training_support import config, load

from tbac_core.errors import InvalidParameterError
from tbac_core.loading import load_model
from tbac_core.loading.adapters import (
    ADAPTER_CONFIG,
    AdapterError,
    apply_adapter,
    list_adapters,
)
from tbac_core.modeling.mllm import metaquery_rung_states
from tbac_core.processing.prompt_layout import metaquery_positions
from tbac_core.training import Trainer, TrainingDivergedError, scan_folder
from tbac_core.training.flow import FlowMatchingObjective


def fixed_loss(trainer: Trainer, indices=(0, 1, 2, 3)) -> float:
    """Loss on fixed examples, noise and timesteps (4 draws), without dropout."""
    batch = trainer.data.batch(list(indices))
    dropout = trainer.config.caption_dropout
    trainer.config.caption_dropout = 0.0
    try:
        with torch.no_grad():
            return sum(float(trainer.loss_for(batch, torch.Generator().manual_seed(s))) for s in range(4)) / 4
    finally:
        trainer.config.caption_dropout = dropout


def test_loss_falls_and_frozen_weights_stay_bit_identical(checkpoint_dir, data_dir, tmp_path):
    model = load(checkpoint_dir)
    mllm_before = {k: v.clone() for k, v in model.mllm.state_dict().items()}
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    base, count = model.base_vocab, model.config.num_metaqueries
    trainer = Trainer(model, config(tmp_path, data_dir, max_steps=25, caption_dropout=0.0))
    trainer.data.examples = [ex for ex in trainer.data.examples if not ex.is_edit]  # a tiny text-to-image batch
    before = fixed_loss(trainer)
    result = trainer.train()
    after = fixed_loss(trainer)
    assert after < 0.7 * before, (before, after, result.losses)

    # The embedding matrix is never optimised: only the separate metaquery parameter moved.
    for key, value in model.mllm.state_dict().items():
        assert torch.equal(value, mllm_before[key]), key
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key
    trainer.finish()  # writes the trained rows into the embedding
    embed_key = next(k for k in mllm_before if k.endswith("embed_tokens.weight"))
    embedding = model.mllm.state_dict()[embed_key]
    assert torch.equal(embedding[:base], mllm_before[embed_key][:base])
    assert torch.equal(embedding[base + count:], mllm_before[embed_key][base + count:])  # the 2 spare rows
    assert not torch.equal(embedding[base: base + count], mllm_before[embed_key][base: base + count])
    for key, value in model.mllm.state_dict().items():
        if key != embed_key and not key.startswith("lm_head"):
            assert torch.equal(value, mllm_before[key]), key


def test_edit_triples_train_through_the_vision_path(checkpoint_dir, data_dir, tmp_path):
    model = load(checkpoint_dir)
    trainer = Trainer(model, config(tmp_path, data_dir, max_steps=2, batch_size=6))
    assert trainer.data.num_edits == 2 and len(trainer.data) == 6
    result = trainer.train()
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (result.final_dir / ADAPTER_CONFIG).is_file()


def test_resume_continues_exactly(checkpoint_dir, data_dir, tmp_path, one_thread):
    settings = dict(max_steps=4, cache_latents=False)
    straight = Trainer(load(checkpoint_dir), config(tmp_path / "a", data_dir, **settings))
    straight.train()
    interrupted = Trainer(load(checkpoint_dir), config(tmp_path / "b", data_dir, **settings))
    interrupted.train_step()
    interrupted.train_step()
    interrupted.save_checkpoint()  # as if stopped after step 2
    resumed = Trainer(load(checkpoint_dir), config(tmp_path / "b", data_dir, resume="latest", **settings))
    result = resumed.train()
    assert result.losses == [h["loss"] for h in straight.history[2:]]
    for key, value in straight.parts.state_dict().items():
        assert torch.equal(value, resumed.parts.state_dict()[key]), key


def test_lora_adapter_applies_on_a_fresh_base(checkpoint_dir, data_dir, tmp_path):
    model = load(checkpoint_dir)
    base_weights = {k: v.clone() for k, v in model.dit.transformer.state_dict().items()}
    trainer = Trainer(model, config(tmp_path, data_dir, dit_mode="lora", lora_rank=4, max_steps=3))
    result = trainer.train()
    trainer.finish()
    trained_state = model.dit.transformer.state_dict()
    for key, value in base_weights.items():  # peft keeps base weights under base_layer
        live = trained_state.get(key, trained_state.get(key.replace(".weight", ".base_layer.weight")))
        live = live if live is not None else trained_state[key.replace(".bias", ".base_layer.bias")]
        assert torch.equal(live, value), key

    fresh = load(checkpoint_dir)
    apply_adapter(fresh, result.final_dir)
    assert "+final" in fresh.identity.name
    latents = torch.randn(2, fresh.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([500.0, 100.0])
    conditions = [torch.randn(2, fresh.config.num_metaqueries, model.dit.transformer.config.caption_channels,
                              generator=torch.Generator().manual_seed(i)) for i in range(model.dit.num_blocks)]
    conds = [model.dit.transformer.caption_norm(model.dit.transformer.caption_projection(c)) for c in conditions]
    with torch.no_grad():
        expected = model.dit(latents, timestep, conds)
        got = fresh.dit(latents, timestep, conds)
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    # The trained metaquery rows arrived too.
    rows = slice(fresh.base_vocab, fresh.base_vocab + fresh.config.num_metaqueries)
    assert torch.equal(fresh.mllm.get_input_embeddings().weight[rows], model.mllm.get_input_embeddings().weight[rows])


def test_adapters_are_refused_on_other_bases(checkpoint_dir, data_dir, tmp_path):
    trainer = Trainer(load(checkpoint_dir), config(tmp_path, data_dir, max_steps=1))
    final = trainer.train().final_dir
    model = load(checkpoint_dir)
    apply_adapter(model, final)
    with pytest.raises(AdapterError, match="already has an adapter applied"):
        apply_adapter(model, final)

    config_path = final / ADAPTER_CONFIG
    original = json.loads(config_path.read_text())
    other = load(checkpoint_dir)
    for change, message in (({"fingerprint": "0" * 64}, "different weights"),
                            ({"hidden_size": 2048}, "different model architecture")):
        edited = dict(original, base={**original["base"], **change})
        config_path.write_text(json.dumps(edited))
        before = other.dit.connector[0].weight.clone()
        with pytest.raises(AdapterError, match=message):
            apply_adapter(other, final)
        assert torch.equal(other.dit.connector[0].weight, before)  # refused before anything changed
    with pytest.raises(AdapterError, match="not a TBAC trained-parts folder"):
        apply_adapter(other, tmp_path)

    assert list_adapters(tmp_path) == ["run/final"]
    assert list_adapters(tmp_path / "missing") == []


def test_nan_guard_stops_with_a_clear_message(checkpoint_dir, data_dir, tmp_path):
    model = load(checkpoint_dir)
    trainer = Trainer(model, config(tmp_path, data_dir, max_steps=3))
    with torch.no_grad():
        model.dit.connector[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"step 1: the loss is nan.*Lower the learning rate"):
        trainer.train()


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint_dir, data_dir, tmp_path):
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(load(checkpoint_dir), config(tmp_path, data_dir, gradient_checkpointing=checkpointing))
        batch = trainer.data.batch([0, 1, 4])
        trainer.loss_for(batch, torch.Generator().manual_seed(0)).backward()
        grads.append([p.grad.clone() for p in trainer.parts.parameters()])
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, atol=1e-6, rtol=1e-5)
    assert grads[0][0].abs().sum() > 0  # the metaquery rows get a gradient


def test_grad_enabled_rung_states_match_inference(pipe):
    model = pipe.model
    builder = model.prompts
    inputs = builder.build_batch([("a red circle", [])], model.config.system_prompt, model.metaquery_suffix())
    positions = metaquery_positions(inputs["input_ids"], builder.ids, model.config.num_metaqueries)
    rungs = [0, 2, 5]
    plain = metaquery_rung_states(model.mllm, inputs, positions, rungs, builder.ids.image_pad)
    assert not plain.requires_grad
    embedding = model.mllm.get_input_embeddings().weight
    embedding.requires_grad_(True)
    try:
        tracked = metaquery_rung_states(model.mllm, inputs, positions, rungs, builder.ids.image_pad, grad_enabled=True)
    finally:
        embedding.requires_grad_(False)
    assert tracked.requires_grad and torch.equal(tracked.detach(), plain)


def test_flow_objective_follows_the_official_recipe():
    objective = FlowMatchingObjective({"num_train_timesteps": 1000, "flow_shift": 3.0})
    assert objective.shift == 3.0 and torch.allclose(objective.timesteps, 1000 * objective.sigmas)
    assert objective.sigmas[500].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # unshifted s = 500/1000
    latents = torch.randn(64, 4, 2, 2)
    noised = objective.noise(latents, torch.Generator().manual_seed(0))
    sigma = noised.sigmas.view(-1, 1, 1, 1)
    noise = noised.target + latents
    assert torch.allclose(noised.noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6)
    assert torch.allclose(noised.timesteps, 1000 * noised.sigmas)
    assert FlowMatchingObjective({"num_train_timesteps": 1000, "flow_shift": 3.0}, shift=1.0).sigmas[500].item() == pytest.approx(0.5)
    assert FlowMatchingObjective.loss(noised.target, noised.target) == 0


def test_data_layout_and_errors(data_dir, tmp_path):
    examples = scan_folder(data_dir)
    edits = [ex for ex in examples if ex.is_edit]
    assert len(examples) == 6 and len(edits) == 2
    assert edits[0].sources[0].name.endswith("_source.png") and edits[0].target.name.endswith("_target.png")
    assert edits[0].text.startswith(("make the", "turn the"))
    (tmp_path / "lonely.png").write_bytes((data_dir / "00000.png").read_bytes())
    with pytest.raises(InvalidParameterError, match="lonely.png has no caption file lonely.txt"):
        scan_folder(tmp_path)
    with pytest.raises(InvalidParameterError, match="not found"):
        scan_folder(tmp_path / "nope")


def test_train_cli_subcommand(checkpoint_dir, data_dir, tmp_path):
    from tbac_core.training.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "cli-run"
    args = parser.parse_args(["train", "--model", str(checkpoint_dir), "--dtype", "fp32", "--device", "cpu",
                              "--data", str(data_dir), "--out", str(out), "--steps", "2", "--batch-size", "2",
                              "--dit", "lora", "--lora-rank", "2", "--sample-every", "2", "--sample-steps", "2",
                              "--export", str(tmp_path / "merged")])
    assert args.handler(SimpleNamespace(args=args, log=lambda message: None)) == 0
    assert list_adapters(out) == ["final"]
    assert (out / "samples" / "step-000002.png").is_file()
    # A standalone checkpoint in the official format; the fixture's components sit next to its base.
    merged = load_model(tmp_path / "merged", dtype="fp32", device="cpu",
                        models_dirs=[checkpoint_dir.parent])
    trained = load(checkpoint_dir)
    apply_adapter(trained, out / "final")
    for key, value in trained.dit.transformer.state_dict().items():
        assert torch.equal(merged.dit.transformer.state_dict()[key], value), key
