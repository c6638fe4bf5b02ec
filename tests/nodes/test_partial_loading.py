"""Partial loading inside ComfyUI: a part loaded partly gives what it gives loaded fully, within the budget.

Two drivers of the same bridge code: ComfyUI's real ``ModelPatcher`` (when ``TBAC_COMFYUI_DIR``
points at a checkout; ``tests/support/partial_load_check.py`` runs in its Python) and, everywhere,
the reduced contract of ``tests/support/fake_model_patcher.py``. On a CPU the compute and offload
devices are one memory, so "on the compute device" is the patcher's per-layer decision: every
tensor but those of the layers it left offloaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_model_patcher import FakeMemoryManager, fake_comfy
from pack import PACK

bridge = PACK.nodes.comfy_bridge
layer_offload = PACK.tbac_core.modeling.layer_offload
SamplingParams = PACK.tbac_core.params.SamplingParams
ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("TBAC_COMFYUI_DIR")
FRACTIONS = (0.5, 0.1)


def outputs(pipeline) -> dict:
    cond = pipeline.encode("a red cat on a blue chair")
    latents = pipeline.sample(cond, width=64, height=64, params=SamplingParams(steps=1, guidance_scale=4.5, seed=3))
    return {"encode": torch.cat([cond.sources[0].positive, cond.sources[0].negative]), "step": latents,
            "decode": pipeline.decode(latents)}


# -- the reduced contract (always) -------------------------------------------------------------
@pytest.fixture()
def fake_managed(checkpoint_dir, monkeypatch):
    manager = FakeMemoryManager()
    monkeypatch.setattr(bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(bridge, "comfy", fake_comfy(manager), raising=False)
    tbac = PACK.tbac_core.load_model(checkpoint_dir, device="cpu", dtype="float32")
    return bridge.ManagedModel(tbac, bridge.devices_for("cpu"), "tiny"), manager


def test_the_placement_lets_comfyui_decide_how_much_to_load(fake_managed):
    managed, manager = fake_managed
    managed.pipeline.encode("a cat")
    assert manager.calls and all(not call.get("force_full_load") for call in manager.calls)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_a_partly_loaded_part_gives_the_fully_loaded_result_within_its_budget(fake_managed, fraction):
    managed, manager = fake_managed
    reference = outputs(managed.pipeline)
    manager.fraction = fraction
    partial = outputs(managed.pipeline)
    for key in reference:
        torch.testing.assert_close(partial[key], reference[key], atol=0, rtol=0, msg=key)
    for part, patcher in managed.pipeline.placement._patchers.items():
        holder = patcher.model
        budget = fraction * patcher.model_size()
        offloaded = [m for m in holder.modules() if getattr(m, "comfy_cast_weights", False)]
        assert offloaded and all(m.weights_offloaded for m in offloaded), part  # the layers follow the marks
        stranded = [m for m in patcher.managed_modules() if not getattr(m, "comfy_patched_weights", False)
                    and m not in offloaded and not any(o is m for o, _, _ in layer_offload.resident_tensors(holder))]
        assert stranded == [], part
        resident = sum(layer_offload.tensor_bytes(m) for m in {id(o): o for o, _, _ in
                                                              layer_offload.resident_tensors(holder)}.values())
        on_compute = sum(layer_offload.tensor_bytes(m) for m in holder.modules()) - sum(
            layer_offload.tensor_bytes(m) for m in offloaded)
        assert patcher.loaded_bytes <= budget and on_compute <= budget + resident, part


# -- ComfyUI's own ModelPatcher (with a checkout) ----------------------------------------------
def _comfy_partial_load_check(fixture_root, *options: str) -> dict:
    if not COMFYUI_DIR:
        pytest.skip("set TBAC_COMFYUI_DIR to a ComfyUI checkout")
    python = os.environ.get("TBAC_COMFYUI_PYTHON", sys.executable)
    script = ROOT / "tests" / "support" / "partial_load_check.py"
    run = subprocess.run([python, str(script), COMFYUI_DIR, str(ROOT), str(fixture_root / "checkpoint"),
                          "--fractions", ",".join(map(str, FRACTIONS)), *options],
                         check=False, capture_output=True, text=True, timeout=900, cwd=COMFYUI_DIR,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("FIGURES ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1][len("FIGURES "):])


@pytest.fixture(scope="module")
def comfy_figures(fixture_root) -> dict:
    return _comfy_partial_load_check(fixture_root, "--quantizations", "none,q4_k")


@pytest.fixture(scope="module")
def comfy_patched_figures(fixture_root) -> dict:
    return _comfy_partial_load_check(fixture_root, "--quantizations", "none", "--patched")


@pytest.mark.parametrize("quantization", ["none", "q4_k"])
@pytest.mark.parametrize("fraction", [str(f) for f in FRACTIONS])
def test_comfyui_partial_loading_gives_the_full_load_result(comfy_figures, quantization, fraction):
    entry = comfy_figures[quantization]["budgets"][fraction]
    assert entry["max_diff"] == {"encode": 0.0, "step": 0.0, "decode": 0.0}
    for part in ("mllm", "dit", "vae"):
        figures = entry[part]
        budget = float(fraction) * figures["size"]
        assert figures["offloaded_layers"] > 0 and figures["flag_followed"] and figures["stranded"] == [], part
        assert figures["comfy_loaded"] <= budget, part
        assert figures["on_compute"] <= budget + figures["resident"], part
    assert all(comfy_figures[quantization]["full"][part]["offloaded_layers"] == 0 for part in ("mllm", "dit"))


@pytest.mark.parametrize("fraction", [str(f) for f in FRACTIONS])
def test_comfyui_weight_patches_reach_the_layers_a_partial_load_leaves_offloaded(comfy_patched_figures, fraction):
    """A LoRA patched in by ComfyUI: applied in place on a full load, per call (``weight_function``) to the
    layers a partial load streams. Both must give the same result (before the fix the streamed layers
    dropped their patches)."""
    figures = comfy_patched_figures["none"]
    assert all(effect > 1e-3 for effect in figures["patch_effect"].values())  # the patches change every output
    entry = figures["budgets"][fraction]
    assert all(entry[part]["offloaded_layers"] > 0 for part in ("mllm", "dit", "vae"))
    assert entry["max_diff"] == {"encode": 0.0, "step": 0.0, "decode": 0.0}
