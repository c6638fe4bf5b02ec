"""Ladder controls on the tiny fixture: select, weight, mix, inspect, save and load.

Tiny model: 7 rungs (0 embeddings .. 6 final norm), 4 DiT blocks, 8 metaqueries, hidden 64; the
default mapping feeds blocks 0-3 with rungs 2-5.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tbac_core.errors import IncompatibleConditioningError
from tbac_core.ladder.layer_spec import LayerSpecError
from tbac_core.ladder.ops import (
    ConditioningFileError,
    block_similarity,
    inspect,
    load_conditioning,
    mix,
    parse_mix_spec,
    rung_norms,
    rung_similarity,
    save_conditioning,
    select_layers,
    weight_blocks,
)
from tbac_core.params import SamplingParams

PROMPT_A = "a red cat sitting on a blue chair"
PROMPT_B = "a small green house next to the river"
PARAMS = SamplingParams(steps=2, guidance_scale=4.5, seed=5)


@pytest.fixture(scope="module")
def embed(pipe):
    return pipe.model.dit.embed_condition


@pytest.fixture(scope="module")
def a_all(pipe):
    return pipe.encode(PROMPT_A, keep_all_rungs=True)


@pytest.fixture(scope="module")
def b_all(pipe):
    return pipe.encode(PROMPT_B, keep_all_rungs=True)


@pytest.fixture(scope="module")
def a_default(pipe):
    return pipe.encode(PROMPT_A)


@pytest.fixture(scope="module")
def edit_cond(pipe, fixture_root):
    image = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    return pipe.encode([PROMPT_A, PROMPT_B], images=[image], negative_prompt="blurry")


def conditions(cond, embed, branch="positive"):
    with torch.no_grad():
        return cond.block_conditions(branch, embed)


def assert_same_conditions(x, y, embed):
    for branch in ("positive", "negative"):
        for block, (p, q) in enumerate(zip(conditions(x, embed, branch), conditions(y, embed, branch))):
            assert torch.equal(p, q), f"{branch} block {block} differs"


def sample(pipe, cond):
    return pipe.sample(cond, width=64, height=64, params=PARAMS)


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


# -- mix spec ----------------------------------------------------------------------------------
T = 1 / 3
VALID_MIX_SPECS = [
    ("a", 4, [0, 0, 0, 0]),
    ("B", 4, [1, 1, 1, 1]),
    ("fade", 4, [0, T, 2 * T, 1]),
    ("a->b", 4, [0, T, 2 * T, 1]),
    ("b->a", 4, [1, 2 * T, T, 0]),
    ("0-1:a, 2-3:b", 4, [0, 0, 1, 1]),
    ("0..1 : b", 4, [1, 1, 0, 0]),
    ("aabb", 4, [0, 0, 1, 1]),
    (" a b A b ", 4, [0, 1, 0, 1]),
    ("fade 1-4", 6, [0, 0, 1 / 3, 2 / 3, 1, 1]),
    ("fade 2..2", 4, [0, 0, 0, 1]),
    ("0.25", 4, [0.25] * 4),
    ("all: .5", 4, [0.5] * 4),
    ("1e-1", 4, [0.1] * 4),
    ("3-0:fade", 4, [1, 2 * T, T, 0]),
    ("*:0->0.5", 4, [0, 1 / 6, 1 / 3, 0.5]),
    ("b, 0:a", 4, [0, 1, 1, 1]),
    ("2:0.5->1", 4, [0, 0, 0.5, 0]),
    ("FADE", 1, [0]),
    ("b", 1, [1]),
    ("fade, 0-1:b", 4, [1, 1, 2 * T, 1]),
]


@pytest.mark.parametrize("spec, blocks, expected", VALID_MIX_SPECS)
def test_mix_spec_parses(spec, blocks, expected):
    assert parse_mix_spec(spec, blocks) == pytest.approx(expected, abs=1e-12)


def test_mix_spec_fades_end_exactly_on_a_and_b():
    shares = parse_mix_spec("fade", 20)
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares == sorted(shares)


MALFORMED_MIX_SPECS = [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("a,,b", "empty item"),
    ("a,", "empty item"),
    ("c", "'c' is not 'a', 'b' or a number"),
    ("0-4:a", "block 4 is out of range"),
    ("-1:a", "block -1 is out of range"),
    ("0-3", "'0-3' is not 'a', 'b' or a number"),
    ("0-3:", "a value is missing"),
    (":a", "block selector is missing"),
    ("x:a", "'x' is not a block selector"),
    ("0-1-2:a", "is not a block selector"),
    ("1.5", "share 1.5 is outside 0..1"),
    ("-0.5", "share -0.5 is outside 0..1"),
    ("1e999", "outside 0..1"),
    ("nan", "not 'a', 'b' or a number"),
    ("inf", "not 'a', 'b' or a number"),
    ("aab", "names 3 blocks but the DiT has 4"),
    ("aabba", "names 5 blocks"),
    ("fade 3-1", "runs backwards"),
    ("fade x", "'fade' needs two blocks"),
    ("fade 0-9", "block 9 is out of range"),
    ("0-1:b->", "needs a value on each side of '->'"),
    ("->b", "needs a value on each side of '->'"),
    ("a->b->a", "'b->a' is not"),
    ("a->c", "'c' is not"),
    ("0-1:a:b", "is not 'a', 'b' or a number"),
    ("9" * 40 + ":a", "out of range"),
]


@pytest.mark.parametrize("spec, message", MALFORMED_MIX_SPECS)
def test_mix_spec_refuses_malformed_input(spec, message):
    with pytest.raises(LayerSpecError) as caught:
        parse_mix_spec(spec, 4)
    text = str(caught.value)
    assert text.startswith("Invalid mix spec") and message in text


def test_mix_spec_refuses_non_text_and_bad_block_counts():
    with pytest.raises(LayerSpecError, match="expected a string"):
        parse_mix_spec(None, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        parse_mix_spec("a", 0)


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


# -- inspect -----------------------------------------------------------------------------------
def test_rung_norms_and_self_similarity(a_all, embed):
    norms = rung_norms(a_all.sources[0])
    assert norms.shape == (7, 1, 8)
    torch.testing.assert_close(norms, a_all.sources[0].positive.norm(dim=-1))
    torch.testing.assert_close(rung_similarity(a_all, a_all), torch.ones(7, 1))
    torch.testing.assert_close(block_similarity(a_all, a_all, embed), torch.ones(4, 1))


def test_block_similarity_follows_the_mix(a_all, b_all, embed):
    mixed = mix(a_all, b_all, "0-1:a, 2-3:b")
    to_b = block_similarity(mixed, b_all, embed)
    torch.testing.assert_close(to_b[2:], torch.ones(2, 1))
    torch.testing.assert_close(to_b[:2], block_similarity(a_all, b_all, embed)[:2])
    assert (to_b[:2] < 0.999).all()
    # Without a model the recipe is evaluated on the metaquery states themselves.
    torch.testing.assert_close(block_similarity(a_all, b_all)[:, 0], rung_similarity(a_all, b_all)[2:6, 0])


def test_inspect_draws_and_summarises(a_all, b_all, a_default, embed):
    image, summary = inspect(a_default)
    assert image.mode == "RGB" and image.width >= 800
    assert torch.from_numpy(np.asarray(image, dtype=np.float32)).std() > 10  # something is drawn
    assert "Mapping: blocks 0-3 <- rungs 2-5" in summary and "rungs kept 0..5" in summary
    assert "Block recipes" not in summary and "similarity" not in summary

    mixed = weight_blocks(mix(a_all, b_all, "fade"), "3:0.5")
    compared, text = inspect(mixed, b_all, embed)
    assert compared.height > image.height  # one row per source plus the similarity row
    assert "block 1: 0.6667 x s0[3] + 0.3333 x s1[3]" in text and "block 3: 0.5 x s1[5]" in text
    assert "per DiT block 0..3 (in the DiT's caption space" in text
    values = [float(v) for v in text.split("per DiT block 0..3")[1].split(": ", 1)[1].split()]
    assert values == pytest.approx(block_similarity(mixed, b_all, embed)[:, 0].tolist(), abs=1e-3)
    _, without_model = inspect(mixed, b_all)
    assert "on the metaquery states (no model given)" in without_model


def test_inspect_refuses_what_it_cannot_compare(pipe, a_all, b_all):
    with pytest.raises(IncompatibleConditioningError, match="another"):
        inspect(a_all, replace(b_all, model=replace(b_all.model, name="another", fingerprint="0" * 64)))
    with pytest.raises(IncompatibleConditioningError, match="Cannot compare 2 prompts with 3"):
        inspect(pipe.encode(["x", "y"]), pipe.encode(["x", "y", "z"]))


# -- save / load -------------------------------------------------------------------------------
def assert_round_trip(original, loaded):
    assert loaded.model == original.model
    assert loaded.blocks == original.blocks
    assert len(loaded.sources) == len(original.sources)
    for x, y in zip(original.sources, loaded.sources):
        assert (x.prompts, x.negative_prompt, x.num_input_images) == (y.prompts, y.negative_prompt, y.num_input_images)
        for branch in ("positive", "negative", "image_negative"):
            p, q = x.branch(branch), y.branch(branch)
            assert (p is None) == (q is None)
            if p is not None:
                assert p.dtype == q.dtype and torch.equal(p, q)


def test_save_load_round_trips_bit_exactly(pipe, tmp_path, a_all, b_all, a_default, edit_cond):
    recipes = weight_blocks(mix(a_all, b_all, [0, 1 / 3, 0.7, 1]), "0:0.1, 1:-1e-7")
    cases = {
        "plain": a_default,
        "recipes": recipes,
        "edit": edit_cond,
        "bf16": a_default.to(dtype=torch.bfloat16),
    }
    for name, cond in cases.items():
        path = save_conditioning(cond, tmp_path / f"{name}.safetensors")
        loaded = load_conditioning(path, expected=pipe.model.identity)
        assert_round_trip(cond, loaded)
        assert loaded.info == cond.info
    loaded = load_conditioning(tmp_path / "recipes.safetensors")
    assert torch.equal(sample(pipe, loaded), sample(pipe, recipes))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.safetensors" for n in cases)


def test_save_never_overwrites_unless_asked(tmp_path, a_default, b_all):
    path = save_conditioning(a_default, tmp_path / "look.safetensors")
    with pytest.raises(FileExistsError, match="already exists"):
        save_conditioning(b_all, path)
    assert load_conditioning(path).prompts == (PROMPT_A,)
    save_conditioning(b_all, path, overwrite=True)
    assert load_conditioning(path).prompts == (PROMPT_B,)
    with pytest.raises(ConditioningFileError, match="must end in .safetensors"):
        save_conditioning(a_default, tmp_path / "look.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["look.safetensors"]


def test_a_failed_save_leaves_no_file(tmp_path, a_default, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_conditioning(a_default, tmp_path / "look.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_another_model(tmp_path, a_default, pipe):
    path = save_conditioning(a_default, tmp_path / "look.safetensors")
    other = replace(pipe.model.identity, name="TBAC-UniImage-3B", fingerprint="ab" * 32, hidden_size=2048)
    with pytest.raises(IncompatibleConditioningError) as caught:
        load_conditioning(path, expected=other)
    text = str(caught.value)
    assert "look.safetensors" in text and "TBAC-UniImage-3B" in text and "Encode the prompt again" in text


def _good_file(tmp_path, cond):
    path = save_conditioning(cond, tmp_path / "good.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return path, metadata, tensors


def _edit_document(metadata, change):
    document = json.loads(metadata["tbac_conditioning"])
    change(document)
    return {**metadata, "tbac_conditioning": json.dumps(document)}


def _set(path, value):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


BROKEN_FILES = {
    "garbage": ("raw", b"this is not a safetensors file at all", "not a readable .safetensors file"),
    "empty": ("raw", b"", "not a readable .safetensors file"),
    "truncated": ("truncate", None, "not a readable .safetensors file"),
    "no metadata": ("meta", lambda m: {}, "not a saved TBAC ladder conditioning"),
    "other format": ("meta", lambda m: {**m, "tbac_format": "something-else"}, "not a saved TBAC ladder"),
    "newer version": ("meta", lambda m: {**m, "tbac_format_version": "2"}, "format version '2'"),
    "bad json": ("meta", lambda m: {**m, "tbac_conditioning": "{"}, "malformed conditioning metadata"),
    "no model": ("meta", lambda m: _edit_document(m, lambda d: d.pop("model")), "metadata lacks 'model'"),
    "bad identity": ("meta", lambda m: _edit_document(m, _set(["model", "num_rungs"], "7")), "model.num_rungs"),
    "bad term": ("meta", lambda m: _edit_document(m, _set(["blocks", 0], [[0, "2", 1.0]])), "malformed term"),
    "nan weight": ("meta", lambda m: _edit_document(m, _set(["blocks", 0], [[0, 2, float("nan")]])), "malformed term"),
    "missing rung": ("meta", lambda m: _edit_document(m, _set(["blocks", 0], [[0, 6, 1.0]])), "reads rung 6"),
    "missing source": ("meta", lambda m: _edit_document(m, _set(["blocks", 0], [[1, 2, 1.0]])), "missing source 1"),
    "three blocks": ("meta", lambda m: _edit_document(m, lambda d: d["blocks"].pop()), "maps 3 blocks"),
    "prompt count": ("meta", lambda m: _edit_document(m, _set(["sources", 0, "prompts"], ["a", "b"])),
                     "names 2 prompts but holds a batch of 1"),
    "no tensor": ("tensors", lambda t: {k: v for k, v in t.items() if k != "source.0.negative"},
                  "'source.0.negative' is missing"),
    "extra tensor": ("tensors", lambda t: {**t, "payload": torch.zeros(3)}, "unexpected tensors ['payload']"),
    "wrong shape": ("tensors", lambda t: {**t, "source.0.positive": t["source.0.positive"][..., :63].contiguous()},
                    "expected [rungs, batch, 8, 64]"),
    "nan states": ("tensors", lambda t: {**t, "source.0.positive": torch.full_like(t["source.0.positive"], float("nan"))},
                   "NaN or infinite"),
    "integer states": ("tensors", lambda t: {**t, "source.0.negative": t["source.0.negative"].long()},
                       "not floating-point"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_load_refuses_malformed_files(tmp_path, a_default, case):
    kind, change, message = BROKEN_FILES[case]
    path, metadata, tensors = _good_file(tmp_path, a_default)
    broken = tmp_path / "broken.safetensors"
    if kind == "raw":
        broken.write_bytes(change)
    elif kind == "truncate":
        broken.write_bytes(path.read_bytes()[:-100])
    elif kind == "meta":
        save_file(tensors, str(broken), metadata=change(metadata))
    else:
        save_file(change(tensors), str(broken), metadata=metadata)
    with pytest.raises(ConditioningFileError) as caught:
        load_conditioning(broken)
    assert message in str(caught.value) and "broken.safetensors" in str(caught.value)


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(ConditioningFileError, match="does not exist"):
        load_conditioning(tmp_path / "nothing.safetensors")
