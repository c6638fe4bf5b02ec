"""Run API-format workflows in a real ComfyUI's Python: core nodes for real, the pack as ComfyUI loads it.

    python comfy_workflows.py COMFYUI_DIR PACK_ROOT FIXTURE_ROOT INPUT_DIR WORKFLOW.json ...
        -> one line "RESULTS {name: {"saved": {node: [shape, finite, std]}, "error": str | null}}"

For the workflows that drive the pack through ComfyUI's own sampling (KSampler on the native model,
core VAE Decode; see ``graph_runner.NEEDS_REAL_COMFYUI``). The graph is walked by ``graph_runner``
(links, validation, caching) over ComfyUI's real node classes (``nodes.NODE_CLASS_MAPPINGS``) and the
pack's V3 nodes; only the file nodes (Load Image, Save / Preview Image) are graph_runner's recording
doubles, so nothing is written outside the temporary folders. Runs under ``torch.inference_mode`` as
ComfyUI's executor does. ``tbac-tiny`` in the loader is the tiny fixture. Used by
``tests/workflows/test_workflows.py``.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import traceback
from pathlib import Path

import real_comfyui

comfy_dir, pack_root, fixture_root, input_dir = (Path(arg) for arg in sys.argv[1:5])
workflow_files = [Path(arg) for arg in sys.argv[5:]]
real_comfyui.import_comfyui(comfy_dir)
import folder_paths
import torch

import nodes as core_nodes

pack = real_comfyui.import_pack(pack_root)
spec = importlib.util.spec_from_file_location("graph_runner", real_comfyui.HERE / "graph_runner.py")
graph_runner = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = graph_runner  # its dataclasses look their module up there
spec.loader.exec_module(graph_runner)

models_root = graph_runner.make_models_root(Path(tempfile.mkdtemp()) / "tbac", fixture_root)
folder_paths.add_model_folder_path("tbac", str(models_root))
recorder = graph_runner.Recorder()
doubles = graph_runner.make_core_doubles(input_dir, recorder)
classes = dict(core_nodes.NODE_CLASS_MAPPINGS)
classes.update(real_comfyui.pack_node_classes(pack))
classes.update({name: doubles[name] for name in ("LoadImage", "SaveImage", "PreviewImage", "PreviewAny")})
runner = graph_runner.GraphRunner(classes)

results = {}
for path in workflow_files:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    entry = {"saved": {}, "error": None}
    try:
        with torch.inference_mode():
            runner.run(workflow)
        for node_id, node in workflow.items():
            if node["class_type"] in ("SaveImage", "PreviewImage"):
                images = recorder.images[node_id]
                entry["saved"][node_id] = [list(images.shape), bool(torch.isfinite(images).all()),
                                           float(images.std())]
    except Exception:  # noqa: BLE001 -- deliberate: report every workflow's failure, then go on with the next
        entry["error"] = traceback.format_exc()[-3000:]
    results[path.stem] = entry
print("RESULTS " + json.dumps(results))
