"""Run inside a real ComfyUI's Python: TBAC parts loaded partially by ComfyUI's own ModelPatcher vs fully.

    python partial_load_check.py COMFYUI_DIR PACK_ROOT CHECKPOINT_DIR [MODELS_DIR]
        [--quantizations none,q4_k] [--fractions 0.5,0.1] [--repeats N]  -> one "FIGURES {json}" line

On a CPU-only machine ComfyUI's memory manager never loads partially (its ``load_models_gpu`` treats
a CPU load device as "VRAM disabled" and loads fully), so the budget is given the way
``load_models_gpu`` hands it over: ``LoadedModel(patcher).model_load(lowvram_model_memory)``, the
call it makes once it has worked out the free memory. Everything after that is ComfyUI's code:
``partially_load`` -> ``load`` decides, layer by layer, what goes to the compute device and marks
the rest ``comfy_cast_weights``; our ON_LOAD callback then follows those marks.

"On the compute device" is counted per tensor: every tensor of the part except those of the layers
ComfyUI left offloaded (on a GPU machine they are the bytes in VRAM; on the CPU both devices are
the same memory, so the split is the patcher's decision, which is what this checks).
Used by ``tests/nodes/test_partial_loading.py`` and, with the bench model, for the report's figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("comfy_dir", type=Path)
parser.add_argument("pack_root", type=Path)
parser.add_argument("checkpoint", type=Path)
parser.add_argument("models_dir", type=Path, nargs="?")
parser.add_argument("--quantizations", default="none", help="comma-separated: none, fp8, q4_k, ...")
parser.add_argument("--fractions", default="0.5,0.1")
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--size", type=int, default=64)
parser.add_argument("--patched", action="store_true",
                    help="first give every part ComfyUI weight patches (a LoRA's diffs on every matrix weight)")
options = parser.parse_args()

HERE = Path(__file__).resolve().parent  # holds the tests' comfy_api double: the real one must win
sys.path = [str(options.comfy_dir)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.argv = ["main.py", "--cpu"]
import comfy.options

comfy.options.enable_args_parsing()
import comfy.cli_args
import comfy.model_management as mm
import folder_paths  # noqa: F401
import torch

spec = importlib.util.spec_from_file_location("tbac_partial_check", options.pack_root / "__init__.py",
                                              submodule_search_locations=[str(options.pack_root)])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
bridge = pack.nodes.comfy_bridge
layer_offload = pack.tbac_core.modeling.layer_offload
SamplingParams = pack.tbac_core.params.SamplingParams
assert bridge.IN_COMFYUI

PROMPT, SIZE = "a red cat on a blue chair", options.size
budget = {"fraction": None}  # None: ComfyUI's own load_models_gpu (a full load on the CPU)
real_load_models_gpu = mm.load_models_gpu


def budgeted_load_models_gpu(models, **kwargs):
    """``load_models_gpu`` with the free memory replaced by ``fraction`` of each model's size."""
    if budget["fraction"] is None:
        return real_load_models_gpu(models, **kwargs)
    for patcher in models:
        memory = max(0.1, budget["fraction"] * patcher.model_size())  # 0.1: ComfyUI's "no VRAM"
        if getattr(patcher, "_check_budget", None) != memory:
            patcher.detach()  # start from nothing, as a model that was unloaded
            mm.LoadedModel(patcher).model_load(memory)
            patcher._check_budget = memory
    return None


mm.load_models_gpu = budgeted_load_models_gpu


def placement_figures(patchers, part: str) -> dict:
    holder = patchers[part].model
    offloaded = [m for m in holder.modules() if getattr(m, bridge.COMFY_CAST_FLAG, False)]
    total = sum(layer_offload.tensor_bytes(m) for m in holder.modules())
    streamed = sum(layer_offload.tensor_bytes(m) for m in offloaded)
    # A module holding state that is neither loaded by ComfyUI, nor offloaded for casting, nor resident.
    resident = {id(owner) for owner, _, _ in layer_offload.resident_tensors(holder)}
    stranded = [n for n, m in holder.named_modules() if layer_offload._is_layer(m) and id(m) not in resident
                and not getattr(m, "comfy_patched_weights", False) and m not in offloaded]
    return {
        "size": patchers[part].model_size(),
        "comfy_loaded": holder.model_loaded_weight_memory,
        "on_compute": total - streamed,
        "resident": layer_offload.place_resident(holder, patchers[part].load_device),
        "offloaded_layers": len(offloaded),
        "flag_followed": sum(bool(m.weights_offloaded) for m in offloaded) == len(offloaded),
        "stranded": stranded,
    }


def timed(function, repeats: int):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        seconds.append(time.perf_counter() - start)
    return value, statistics.median(seconds)


def run(pipeline) -> tuple[dict, dict]:
    with torch.no_grad():
        cond, encode_s = timed(lambda: pipeline.encode(PROMPT), options.repeats)
        states = torch.cat([cond.sources[0].positive, cond.sources[0].negative])  # [rungs, 2B, N, H]
        params = SamplingParams(steps=1, guidance_scale=4.5, seed=3)
        latents, step_s = timed(lambda: pipeline.sample(cond, width=SIZE, height=SIZE, params=params),
                                options.repeats)
        images = pipeline.decode(latents)
    outputs = {"encode": states, "step": latents, "decode": images}
    return outputs, {"encode_s": encode_s, "step_s": step_s}


def add_diff_patches(patcher) -> int:
    """Small random diffs on every floating-point matrix weight of the part, as a LoRA loader adds them,
    and a weight wrapper (applied per call even to a fully loaded layer) on the last of them (not the
    part's first layer, which stays resident as a plain layer)."""
    generator = torch.Generator().manual_seed(0)
    weights = {key: value for key, value in patcher.model.state_dict().items()
               if key.endswith(".weight") and value.dim() >= 2 and value.is_floating_point()}
    patches = {key: ("diff", (0.02 * torch.randn(value.shape, generator=generator).to(value.dtype),))
               for key, value in weights.items()}
    patcher.add_weight_wrapper(list(weights)[-1], lambda weight: weight * 1.5)
    return len(patcher.add_patches(patches, 1.0))


def check(quantization: str | None) -> dict:
    tbac = pack.tbac_core.load_model(options.checkpoint, device="cpu", dtype="float32", quantization=quantization,
                                     models_dirs=[options.models_dir or options.checkpoint.parent])
    pipeline = bridge.ManagedModel(tbac, bridge.devices_for("cpu"), "check").pipeline
    patchers = pipeline.placement._patchers
    budget["fraction"] = None
    pipeline.encode(PROMPT)  # warm-up (first-call allocations)
    patch_effect = None
    if options.patched:  # ComfyUI applies them in place on a full load, per call to offloaded layers
        unpatched, _ = run(pipeline)
        for part, patcher in patchers.items():
            add_diff_patches(patcher)
    reference, reference_times = run(pipeline)
    if options.patched:
        patch_effect = {key: float((reference[key].float() - unpatched[key].float()).abs().max()) for key in reference}
    figures = {"full": {**reference_times, **{part: placement_figures(patchers, part) for part in patchers}},
               "budgets": {}, "patch_effect": patch_effect}
    for fraction in [float(f) for f in options.fractions.split(",")]:
        budget["fraction"] = fraction
        outputs, times = run(pipeline)
        entry = {**times, **{part: placement_figures(patchers, part) for part in patchers}}
        entry["max_diff"] = {key: float((outputs[key].float() - reference[key].float()).abs().max())
                             for key in outputs}
        figures["budgets"][str(fraction)] = entry
    return figures


print("FIGURES " + json.dumps({q: check(None if q == "none" else q) for q in options.quantizations.split(",")}))
