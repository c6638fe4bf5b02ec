"""The shipped workflows: UI format well formed, API twins equal to it, and every API twin runs.

Layout: ``example_workflows/<name>.json`` is the UI (graph) format ComfyUI lists in its Templates
dialog (it globs ``example_workflows/*.json``, not sub-folders; ``example_workflows`` is the folder
name ComfyUI recommends, the others it accepts log a rename hint); ``example_workflows/api/<name>.json``
is the API-format twin for scripts and ``python -m comfy_queue``. Shipped workflows name the real checkpoint
(``TBAC-UniImage-3B``); the tests switch the loader to the tiny fixture and shrink sizes/steps.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from graph_runner import (
    CONTROL_AFTER_GENERATE,
    CONTROL_VALUES,
    FRONTEND_EXTRA_VALUES,
    FRONTEND_ONLY_NODES,
    NEEDS_REAL_COMFYUI,
    GraphRunner,
    Recorder,
    WorkflowError,
    input_specs,
    make_core_doubles,
    make_models_root,
    types_match,
    ui_to_api,
    widget_names,
)
from pack import NODE_CLASSES, PACK

bridge = PACK.nodes.comfy_bridge

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
SHIPPED_CHECKPOINT = "TBAC-UniImage-3B"
REQUIRED = ("text_to_image", "edit_image", "understand_image", "understand_then_generate", "batch_prompts",
            "ksampler_tbac")
COMFYUI_DIR = os.environ.get("TBAC_COMFYUI_DIR")

# How the tests shrink a shipped workflow to the tiny fixture, per node class.
TINY_OVERRIDES = {
    "TBACModelLoader": {"checkpoint": "tbac-tiny", "dtype": "fp32", "device": "cpu"},
    "TBACSampler": {"steps": 2, "width": 64, "height": 64},
    "TBACUnderstand": {"max_new_tokens": 4},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _needs_real_comfyui(path: Path) -> bool:
    """Workflows with core sampling on the native model: they run in a real ComfyUI (comfy_workflows.py)."""
    return any(node["class_type"] in NEEDS_REAL_COMFYUI for node in _load(path).values())


GRAPH_RUNNER_FILES = [p for p in API_FILES if not _needs_real_comfyui(p)]
REAL_COMFYUI_FILES = [p for p in API_FILES if _needs_real_comfyui(p)]


@pytest.fixture(scope="module")
def recorder():
    return Recorder()


@pytest.fixture(scope="module")
def classes(tmp_path_factory, fixture_root, recorder):
    """Our nodes plus core doubles, with the tiny fixture in the ``tbac`` model folder."""
    input_dir = tmp_path_factory.mktemp("input")
    shutil.copy(fixture_root / "goldens" / "edit_input_0.png", input_dir / "example.png")
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        table = dict(NODE_CLASSES)
        table.update(make_core_doubles(input_dir, recorder))
        yield table


@pytest.fixture(scope="module")
def runner(classes):
    return GraphRunner(classes)  # one runner: the loader runs once for all workflows, as in ComfyUI


def _known_types(classes) -> set:
    return set(classes) | set(FRONTEND_ONLY_NODES)


# -- files ------------------------------------------------------------------------------------
def test_every_ui_workflow_has_an_api_twin_and_back():
    assert {p.stem for p in UI_FILES} == {p.stem for p in API_FILES}
    assert set(REQUIRED) <= {p.stem for p in UI_FILES}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_template_folder_holds_only_ui_format(path):
    """ComfyUI's template scan lists example_workflows/*.json and the dialog opens them as graphs."""
    data = _load(path)
    assert isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list), f"{path.name} is not UI format"


# -- UI format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_well_formed(path, classes):
    graph = _load(path)
    problems = check_ui_graph(graph, classes)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def check_ui_graph(graph: dict, classes: dict) -> list[str]:
    """Everything the front end relies on when it opens a UI workflow; returns the problems found."""
    problems = []
    nodes_by_id = {}
    for node in graph["nodes"]:
        if node["id"] in nodes_by_id:
            problems.append(f"node id {node['id']} used twice")
        nodes_by_id[node["id"]] = node
    if graph.get("last_node_id", 0) < max(nodes_by_id):
        problems.append("last_node_id is below the largest node id")
    link_ids = [link[0] for link in graph["links"]]
    if len(set(link_ids)) != len(link_ids):
        problems.append("duplicate link ids")
    if link_ids and graph.get("last_link_id", 0) < max(link_ids):
        problems.append("last_link_id is below the largest link id")
    if not any(n["type"] in FRONTEND_ONLY_NODES and n["widgets_values"][0].strip() for n in graph["nodes"]):
        problems.append("no Note tells a newcomer what to set")

    for node in graph["nodes"]:
        kind, where = node["type"], f"node {node['id']} ({node['type']})"
        if kind not in _known_types(classes):
            problems.append(f"{where}: unknown node type")
            continue
        values = node.get("widgets_values") or []
        if kind in FRONTEND_ONLY_NODES:
            if len(values) != len(FRONTEND_ONLY_NODES[kind]):
                problems.append(f"{where}: expected {len(FRONTEND_ONLY_NODES[kind])} widget values")
            continue
        cls = classes[kind]
        names = widget_names(cls)
        expected = len(names) + FRONTEND_EXTRA_VALUES.get(kind, 0)
        if len(values) != expected:
            problems.append(f"{where}: {len(values)} widget values, the node declares {expected} ({names})")
            continue
        specs = {spec.name: spec for spec in input_specs(cls)}
        for name, value in zip(names, values):
            if name == CONTROL_AFTER_GENERATE:
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}: control_after_generate value {value!r}")
            elif name in specs:
                problems += _check_widget_value(where, specs[name], value)
        # sockets: every declared non-widget input has a slot, with its type
        slots = {entry["name"]: entry for entry in node.get("inputs", [])}
        for spec in specs.values():
            if not spec.is_widget and spec.name not in slots:
                problems.append(f"{where}: missing input slot {spec.name!r}")
        for entry in node.get("inputs", []):
            spec = specs.get(entry["name"])
            if spec is None:
                problems.append(f"{where}: input slot {entry['name']!r} is not declared")
            elif spec.is_widget and entry.get("widget", {}).get("name") != spec.name:
                problems.append(f"{where}: widget input {entry['name']!r} lacks its widget reference")
        outputs = node.get("outputs", [])
        if [o["type"] for o in outputs] != list(cls.RETURN_TYPES):
            problems.append(f"{where}: outputs {[o['type'] for o in outputs]} != {list(cls.RETURN_TYPES)}")

    for link_id, source, source_slot, target, target_slot, link_type in graph["links"]:
        where = f"link {link_id}"
        if source not in nodes_by_id or target not in nodes_by_id:
            problems.append(f"{where}: joins missing nodes")
            continue
        outputs = nodes_by_id[source].get("outputs", [])
        inputs = nodes_by_id[target].get("inputs", [])
        if not (0 <= source_slot < len(outputs) and 0 <= target_slot < len(inputs)):
            problems.append(f"{where}: slot out of range")
            continue
        output, entry = outputs[source_slot], inputs[target_slot]
        if link_id not in (output.get("links") or []):
            problems.append(f"{where}: not listed by its source output")
        if entry.get("link") != link_id:
            problems.append(f"{where}: its target input points to link {entry.get('link')}")
        if link_type != output["type"] or not types_match(output["type"], entry["type"]):
            problems.append(f"{where}: type {link_type} joins {output['type']} -> {entry['type']}")
    for node in graph["nodes"]:
        for output in node.get("outputs", []):
            for link_id in output.get("links") or []:
                if link_id not in link_ids:
                    problems.append(f"node {node['id']}: output lists missing link {link_id}")
        for entry in node.get("inputs", []):
            if entry.get("link") is not None and entry["link"] not in link_ids:
                problems.append(f"node {node['id']}: input {entry['name']!r} points to missing link {entry['link']}")
    return problems


def _check_widget_value(where: str, spec, value) -> list[str]:
    if spec.type == "COMBO":
        # Model lists depend on the user's folders; other choices are fixed by the node.
        if spec.name in ("checkpoint", "adapter") or value in spec.choices:
            return []
        return [f"{where}: {spec.name}={value!r} is not one of {list(spec.choices)}"]
    kinds = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
    if isinstance(value, bool) != (spec.type == "BOOLEAN") or not isinstance(value, kinds[spec.type]):
        return [f"{where}: {spec.name}={value!r} is not a {spec.type}"]
    if spec.type in ("INT", "FLOAT") and not spec.options.get("min", value) <= value <= spec.options.get("max", value):
        return [f"{where}: {spec.name}={value} is out of range"]
    return []


def test_ui_checker_catches_broken_graphs(classes):
    """The checker itself: a few typical corruptions are reported."""
    graph = _load(WORKFLOWS / "text_to_image.json")
    assert check_ui_graph(graph, classes) == []
    sampler = next(n for n in graph["nodes"] if n["type"] == "TBACSampler")
    broken = copy.deepcopy(graph)
    next(n for n in broken["nodes"] if n["id"] == sampler["id"])["widgets_values"].pop(1)  # the seed control
    assert any("widget values" in p for p in check_ui_graph(broken, classes))
    broken = copy.deepcopy(graph)
    broken["links"][0][5] = "LATENT"
    assert any("type LATENT" in p for p in check_ui_graph(broken, classes))
    broken = copy.deepcopy(graph)
    broken["nodes"][1]["type"] = "TBACNoSuchNode"
    assert any("unknown node type" in p for p in check_ui_graph(broken, classes))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_matches_its_api_twin(path, classes):
    twin = _load(WORKFLOWS / "api" / path.name)
    expected = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in twin.items()}
    assert ui_to_api(_load(path), classes) == expected


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_shipped_workflows_name_the_released_checkpoint(path):
    loaders = [n for n in _load(path)["nodes"] if n["type"] == "TBACModelLoader"]
    assert loaders and all(n["widgets_values"][0] == SHIPPED_CHECKPOINT for n in loaders)


# -- running the API twins ---------------------------------------------------------------------------
def shrink(workflow: dict) -> dict:
    """The workflow with the loader on the tiny fixture and small sizes/steps (see TINY_OVERRIDES)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        for name, value in TINY_OVERRIDES.get(node["class_type"], {}).items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
    return workflow


@pytest.mark.parametrize("path", GRAPH_RUNNER_FILES, ids=lambda p: p.name)
def test_api_workflow_runs_on_the_tiny_fixture(path, runner, recorder):
    workflow = _load(path)
    with pytest.raises(WorkflowError, match="not in list"):
        runner.validate(workflow)  # as shipped it needs TBAC-UniImage-3B in models/tbac
    result = runner.run(shrink(workflow))
    saved = [node_id for node_id, n in workflow.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    texts = [node_id for node_id, n in workflow.items() if n["class_type"] == "PreviewAny"]
    assert saved or texts, "the workflow shows nothing"
    for node_id in saved:
        images = recorder.images[node_id]
        source = workflow[workflow[node_id]["inputs"]["images"][0]]["class_type"]
        if source == "TBACDecode":  # generated images have the (shrunk) sampler size
            assert images.shape[1:3] == (64, 64)
        assert torch.isfinite(images).all() and images.std() > 0
        assert len(result.ui[node_id]["images"]) == len(images)
    for node_id in texts:
        assert isinstance(recorder.texts[node_id], str)


def test_batch_workflow_renders_one_image_set_per_line(runner, recorder):
    workflow = shrink(_load(WORKFLOWS / "api" / "batch_prompts.json"))
    encode = next(n for n in workflow.values() if n["class_type"] == "TBACLadderEncode")
    sampler = next(n for n in workflow.values() if n["class_type"] == "TBACSampler")
    sampler["inputs"]["batch_size"] = 2
    lines = [line for line in encode["inputs"]["prompt"].splitlines() if line.strip()]
    assert encode["inputs"]["one_prompt_per_line"] and len(lines) >= 3
    runner.run(workflow)
    save = next(node_id for node_id, n in workflow.items() if n["class_type"] == "SaveImage")
    assert len(recorder.images[save]) == 2 * len(lines)


def test_understand_then_generate_feeds_the_answer_into_the_prompt(runner):
    workflow = shrink(_load(WORKFLOWS / "api" / "understand_then_generate.json"))
    encode_id = next(i for i, n in workflow.items() if n["class_type"] == "TBACLadderEncode")
    understand_id = next(i for i, n in workflow.items() if n["class_type"] == "TBACUnderstand")
    assert workflow[encode_id]["inputs"]["prompt"] == [understand_id, 0]
    result = runner.run(workflow)
    answer = result.outputs[understand_id][0]
    assert result.outputs[encode_id][0].prompts == (answer,)


def test_runner_refuses_what_comfyui_refuses(runner):
    workflow = shrink(_load(WORKFLOWS / "api" / "text_to_image.json"))
    sampler = next(n for n in workflow.values() if n["class_type"] == "TBACSampler")
    for name, value, message in (("steps", 0, "below the minimum"), ("sampler", "ddim", "not in list"),
                                 ("conditioning", ["2", 0], "linked to a TBAC_MODEL output")):
        broken = copy.deepcopy(workflow)
        next(n for n in broken.values() if n["class_type"] == "TBACSampler")["inputs"][name] = value
        with pytest.raises(WorkflowError, match=message):
            runner.validate(broken)
    assert sampler["inputs"]["model"] == ["2", 0]


# -- workflows with core sampling on the native model (KSampler, core VAE Decode) --------------------
def test_native_workflows_are_the_ksampler_template():
    assert [p.stem for p in REAL_COMFYUI_FILES] == ["ksampler_tbac"]


@pytest.mark.parametrize("path", REAL_COMFYUI_FILES, ids=lambda p: p.name)
def test_native_workflow_validates_against_the_core_declarations(path, runner):
    workflow = _load(path)
    with pytest.raises(WorkflowError, match="not in list"):
        runner.validate(workflow)  # as shipped it needs TBAC-UniImage-3B in models/tbac
    runner.validate(shrink(workflow))
    # Outside ComfyUI the native nodes refuse with our error (the KSampler double would refuse too).
    with pytest.raises(PACK.tbac_core.errors.InvalidParameterError, match="only runs inside ComfyUI"):
        runner.run(shrink(workflow))


@pytest.fixture(scope="module")
def real_comfyui_results(tmp_path_factory, fixture_root) -> dict:
    """Every native workflow, shrunk, run once in the real ComfyUI (``TBAC_COMFYUI_DIR``)."""
    if not COMFYUI_DIR:
        pytest.skip("set TBAC_COMFYUI_DIR to a ComfyUI checkout (CI has none)")
    folder = tmp_path_factory.mktemp("native_workflows")
    input_dir = folder / "input"
    input_dir.mkdir()
    shutil.copy(fixture_root / "goldens" / "edit_input_0.png", input_dir / "example.png")
    files = []
    for path in REAL_COMFYUI_FILES:
        files.append(folder / path.name)
        files[-1].write_text(json.dumps(shrink(_load(path))), encoding="utf-8")
    python = os.environ.get("TBAC_COMFYUI_PYTHON", sys.executable)
    script = ROOT / "tests" / "support" / "comfy_workflows.py"
    run = subprocess.run([python, str(script), COMFYUI_DIR, str(ROOT), str(fixture_root), str(input_dir),
                          *map(str, files)], check=False, capture_output=True, text=True, timeout=1800, cwd=COMFYUI_DIR,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("path", REAL_COMFYUI_FILES, ids=lambda p: p.name)
def test_native_workflow_runs_in_real_comfyui(path, real_comfyui_results):
    result = real_comfyui_results[path.stem]
    assert result["error"] is None, result["error"]
    saved = [node_id for node_id, n in _load(path).items() if n["class_type"] == "SaveImage"]
    assert saved and sorted(result["saved"]) == sorted(saved)
    for shape, finite, std in result["saved"].values():
        assert shape == [1, 64, 64, 3] and finite and std > 0
