"""tbac_core.ladder.edit on the tiny fixture: select, weight and mix.

Tiny model: 7 rungs (0 embeddings .. 6 final norm), 4 DiT blocks, 8 metaqueries, hidden 64; the
default mapping feeds blocks 0-3 with rungs 2-5 (encodes in conftest.py).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from ladder_checks import (
    PARAMS,
    PROMPT_A,
    PROMPT_B,
    assert_same_conditions,
    conditions,
    sample,
)
from PIL import Image

from tbac_core.errors import IncompatibleConditioningError
from tbac_core.ladder.edit import mix, select_layers, weight_blocks
from tbac_core.ladder.layer_spec import LayerSpecError

T = 1 / 3


# -- select ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["default", "all", "final", "last 2", "default reversed", "1,3", "0-6:2", "-2"])
def test_select_reproduces_the_encoder(pipe, a_all, embed, spec):
    """Remapping a keep-all-rungs encode equals encoding with that layer spec, bit for bit."""
    selected = select_layers(a_all, spec)
    encoded = pipe.encode(PROMPT_A, layers=spec)
    assert selected.block_rungs() == encoded.block_rungs()
    assert_same_conditions(selected, encoded, embed)
    if spec == "default":
        assert selected.blocks == encoded.blocks
        assert torch.equal(sample(pipe, selected), sample(pipe, encoded))


def test_select_default_on_a_default_encode_changes_nothing(pipe, a_default, embed):
    selected = select_layers(a_default, "default")
    assert selected.blocks == a_default.blocks and selected.sources[0] is a_default.sources[0]
    assert torch.equal(sample(pipe, selected), sample(pipe, a_default))


def test_select_refuses_rungs_the_encode_did_not_keep(a_default):
    assert a_default.sources[0].num_rungs_kept == 6  # stopped after rung 5, the deepest default rung
    with pytest.raises(IncompatibleConditioningError, match="keep_all_rungs") as caught:
        select_layers(a_default, "final")
    assert "kept only rungs 0..5" in str(caught.value)
    assert select_layers(a_default, "0-5").block_rungs() == [0, 2, 3, 5]


@pytest.mark.parametrize("spec, message", [("7", "rung 7 is out of range"), ("0-3:0", "step 0"), ("bogus", "not a valid item")])
def test_select_uses_the_encoder_spec_errors(a_all, spec, message):
    with pytest.raises(LayerSpecError, match=message):
        select_layers(a_all, spec)


def test_select_on_a_mix_moves_every_term(a_all, b_all):
    mixed = mix(a_all, b_all, "fade")
    selected = select_layers(mixed, "final")
    for before, after in zip(mixed.blocks, selected.blocks):
        assert [(t.source, t.weight) for t in before] == [(t.source, t.weight) for t in after]
        assert {t.rung for t in after} == {6}


# -- weight ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "1", "*:1.0", "0-3:1", "ramp 1 1"])
def test_weights_of_one_change_nothing(pipe, a_default, embed, spec):
    weighted = weight_blocks(a_default, spec)
    assert weighted.blocks == a_default.blocks
    assert_same_conditions(weighted, a_default, embed)
    assert torch.equal(sample(pipe, weighted), sample(pipe, a_default))


def test_weight_scales_a_block_condition_exactly(a_default, embed):
    weighted = weight_blocks(a_default, "1:0.5, 3:-2")
    for branch in ("positive", "negative"):
        plain, scaled = conditions(a_default, embed, branch), conditions(weighted, embed, branch)
        assert torch.equal(scaled[0], plain[0]) and torch.equal(scaled[2], plain[2])
        assert torch.equal(scaled[1], plain[1] * 0.5) and torch.equal(scaled[3], plain[3] * -2)


def test_weight_zero_equals_a_zero_condition_for_that_block(pipe, a_default, embed):
    """Weight 0 = the block's condition replaced by zeros: its cross-attention outputs a constant."""
    dit = pipe.model.dit
    weighted = weight_blocks(a_default, "2:0")
    plain = conditions(a_default, embed)
    zeroed = conditions(weighted, embed)
    assert torch.equal(zeroed[2], torch.zeros_like(plain[2]))
    assert all(torch.equal(zeroed[i], plain[i]) for i in (0, 1, 3))

    latents = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([700.0])
    by_hand = [c if i != 2 else torch.zeros_like(c) for i, c in enumerate(plain)]
    attn2 = dit.transformer.transformer_blocks[2].attn2
    seen = []
    handle = attn2.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            out_weighted = dit(latents, timestep, zeroed)
            out_by_hand = dit(latents, timestep, by_hand)
            out_plain = dit(latents, timestep, plain)
    finally:
        handle.remove()
    assert torch.equal(out_weighted, out_by_hand)
    assert not torch.allclose(out_weighted, out_plain)
    # Zero condition: keys are all b_k, so attention is uniform and returns b_v for every image token.
    with torch.no_grad():
        constant = attn2.to_out[0](attn2.to_v.bias)
    for output in seen[:2]:
        assert torch.allclose(output, constant.expand_as(output), atol=1e-5)
    assert not torch.allclose(seen[2], constant.expand_as(seen[2]), atol=1e-3)


def test_weight_zero_everywhere_ignores_the_prompt(pipe, a_default):
    b = pipe.encode(PROMPT_B, negative_prompt="something else")
    assert torch.equal(sample(pipe, weight_blocks(a_default, "0")), sample(pipe, weight_blocks(b, "*:0")))
    assert not torch.equal(sample(pipe, a_default), sample(pipe, b))


def test_weight_spec_errors_are_the_layer_spec_ones(a_default):
    with pytest.raises(LayerSpecError, match="block 4 is out of range"):
        weight_blocks(a_default, "4:0.5")
    with pytest.raises(LayerSpecError, match="not finite"):
        weight_blocks(a_default, "nan")


# -- mix ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["a", "*:a", "0-3:a", "aaaa", "b, *:a", "fade, all:a", [0, 0, 0, 0]])
def test_mix_with_every_block_from_a_is_a(pipe, a_default, b_all, spec):
    mixed = mix(a_default, b_all, spec)
    assert mixed.blocks == a_default.blocks
    assert len(mixed.sources) == 1 and mixed.sources[0] is a_default.sources[0]
    assert torch.equal(sample(pipe, mixed), sample(pipe, a_default))


def test_mix_with_every_block_from_b_is_b(pipe, a_all, b_all, embed):
    mixed = mix(a_all, b_all, "bbbb")
    assert mixed.blocks == b_all.blocks and mixed.sources[0] is b_all.sources[0]
    assert torch.equal(sample(pipe, mixed), sample(pipe, b_all))


def test_mix_takes_blocks_from_each_side(a_all, b_all, embed):
    mixed = mix(a_all, b_all, "0-1:a, 2-3:b")
    for branch in ("positive", "negative"):
        got, a, b = (conditions(c, embed, branch) for c in (mixed, a_all, b_all))
        assert torch.equal(got[0], a[0]) and torch.equal(got[1], a[1])
        assert torch.equal(got[2], b[2]) and torch.equal(got[3], b[3])


def test_mix_fade_is_a_linear_blend_in_caption_space(pipe, a_all, b_all, embed):
    mixed = mix(a_all, b_all, "fade")
    assert len(mixed.sources) == 2
    got, a, b = (conditions(c, embed) for c in (mixed, a_all, b_all))
    for block, t in enumerate([0, T, 2 * T, 1]):
        torch.testing.assert_close(got[block], (1 - t) * a[block] + t * b[block], rtol=0, atol=1e-6)
    assert torch.equal(got[0], a[0]) and torch.equal(got[3], b[3])
    latents = sample(pipe, mixed)
    assert torch.isfinite(latents).all()
    assert not torch.equal(latents, sample(pipe, a_all)) and not torch.equal(latents, sample(pipe, b_all))


def test_mix_keeps_weights_and_stores_a_shared_encode_once(a_all):
    weighted = weight_blocks(a_all, "0.5")
    mixed = mix(a_all, weighted, "fade")
    assert len(mixed.sources) == 1
    expected = [[1.0], [2 * T, 0.5 * T], [T, 0.5 * 2 * T], [0.5]]
    assert [[term.weight for term in terms] for terms in mixed.blocks] == [pytest.approx(w) for w in expected]
    assert {term.source for terms in mixed.blocks for term in terms} == {0}


def test_mix_broadcasts_a_single_prompt(pipe, a_all, embed):
    two = pipe.encode([PROMPT_A, PROMPT_B], keep_all_rungs=True)
    mixed = mix(two, a_all, "0.5")
    assert mixed.batch_size == 2
    got, x, y = (conditions(c, embed) for c in (mixed, two, a_all))
    torch.testing.assert_close(got[1], 0.5 * x[1] + 0.5 * y[1].expand_as(x[1]), rtol=0, atol=1e-6)
    assert sample(pipe, mixed).shape[0] == 2


def test_mix_refuses_other_models(a_all, b_all):
    other = replace(b_all, model=replace(b_all.model, name="another", fingerprint="f" * 64))
    with pytest.raises(IncompatibleConditioningError, match="another"):
        mix(a_all, other, "fade")
    with pytest.raises(IncompatibleConditioningError, match="another"):
        mix(other, a_all, "fade")


def test_mix_refuses_batches_that_do_not_pair(pipe, a_all):
    two = pipe.encode([PROMPT_A, PROMPT_B])
    three = pipe.encode([PROMPT_A, PROMPT_B, "a third"])
    with pytest.raises(IncompatibleConditioningError, match="A has 2 prompts and B has 3"):
        mix(two, three, "fade")


def test_mix_refuses_edit_with_text_to_image(edit_cond, a_all):
    assert edit_cond.has_image_guidance
    with pytest.raises(IncompatibleConditioningError, match="A comes from an edit"):
        mix(edit_cond, a_all, "fade")
    with pytest.raises(IncompatibleConditioningError, match="B comes from an edit"):
        mix(a_all, edit_cond, "fade")


def test_mix_of_two_edits_blends_every_branch(pipe, edit_cond, embed, fixture_root):
    image = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    other = pipe.encode("make it green", images=[image])
    mixed = mix(edit_cond, other, "2-3:b")
    for branch in ("positive", "negative", "image_negative"):
        got, x, y = (conditions(c, embed, branch) for c in (mixed, edit_cond, other))
        assert torch.equal(got[0], x[0]) and torch.equal(got[3], y[3].expand_as(x[3]))
    latents = pipe.sample(mixed, width=64, height=64, params=replace(PARAMS, image_guidance_scale=1.5))
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()


def test_mix_refuses_bad_share_lists(a_all, b_all):
    for shares in ([0, 1], [0, 0, 0, 1.5], [0, 0, 0, float("nan")]):
        with pytest.raises(LayerSpecError, match="needs 4 numbers in 0..1"):
            mix(a_all, b_all, shares)


# -- imports -----------------------------------------------------------------------------------
def test_editing_never_imports_matplotlib():
    """Only drawing needs matplotlib: importing the edits and mixing must not load it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = (
        "import sys, torch\n"
        "from tbac_core.ladder.conditioning import BlockTerm, LadderConditioning, ModelIdentity, RungSource\n"
        "from tbac_core.ladder.edit import mix, select_layers, weight_blocks\n"
        "identity = ModelIdentity(name='m', fingerprint='0' * 64, hidden_size=4, num_rungs=4, num_metaqueries=2,"
        " num_dit_blocks=2)\n"
        "def cond(seed):\n"
        "    states = torch.randn(4, 1, 2, 4, generator=torch.Generator().manual_seed(seed))\n"
        "    source = RungSource(positive=states, negative=states.clone(), image_negative=None, prompts=('p',),"
        " negative_prompt='', num_input_images=())\n"
        "    return LadderConditioning((source,), ((BlockTerm(0, 1, 1.0),), (BlockTerm(0, 2, 1.0),)), identity)\n"
        "mixed = weight_blocks(select_layers(mix(cond(0), cond(1), 'fade'), 'all'), '0.5')\n"
        "assert len(mixed.sources) == 2\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'matplotlib'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
