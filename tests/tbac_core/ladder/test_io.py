"""tbac_core.ladder.io on the tiny fixture: save and load conditionings.

Tiny model: 7 rungs (0 embeddings .. 6 final norm), 4 DiT blocks, 8 metaqueries, hidden 64; the
default mapping feeds blocks 0-3 with rungs 2-5 (encodes in conftest.py).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from ladder_checks import PROMPT_A, PROMPT_B, sample
from safetensors import safe_open
from safetensors.torch import save_file

from tbac_core.errors import IncompatibleConditioningError
from tbac_core.ladder.edit import mix, weight_blocks
from tbac_core.ladder.io import (
    ConditioningFileError,
    load_conditioning,
    save_conditioning,
)


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


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_save_leaves_no_file(tmp_path, a_default, monkeypatch, overwrite):
    import os

    def broken(fd):  # the bytes are written, then the disk gives up before they are safe
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        save_conditioning(a_default, tmp_path / "look.safetensors", overwrite=overwrite)
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
