"""The templates' layout for ComfyUI's front end (tools/layout_workflows.py), the rules checkable without a browser.

Fitted zoom of a 1600x1000 window gives text >= 9 px, nothing under the tab bar / toolbar / side bar /
minimap, the note in view, no overlapping nodes, no link behind a node, and the saved view equal to
the fitted one. Every template must also be what the script makes of it, so a new template (or an
edited one) fails here until `python tools/layout_workflows.py` has been run on it. The browser
counterpart is `tools/browser_check.mjs --templates`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
_spec = importlib.util.spec_from_file_location("layout_workflows", ROOT / "tools" / "layout_workflows.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_keeps_the_layout_rules(path):
    problems = layout.check(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_sizes_are_not_enlarged_by_the_front_end(path):
    """A size below the front end's computeSize is enlarged on load, and the checked layout no longer holds."""
    graph = json.loads(path.read_text(encoding="utf-8"))
    small = [f"node {n['id']} ({n['type']}) {n['size']} < {layout.MIN_SIZES[n['type']]}" for n in graph["nodes"]
             if any(have < need for have, need in zip(n["size"], layout.MIN_SIZES.get(n["type"], (0, 0))))]
    unknown = sorted({n["type"] for n in graph["nodes"]} - set(layout.MIN_SIZES))
    assert not small and not unknown, f"too small: {small}; measure these types' computeSize: {unknown}"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_is_laid_out_by_the_script(path):
    graph = json.loads(path.read_text(encoding="utf-8"))
    arranged, _, _ = layout.layout(graph)
    assert arranged == graph, f"run: python tools/layout_workflows.py {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_has_a_thumbnail(path):
    thumb = path.with_suffix(".jpg")  # frontend 1.45: /api/workflow_templates/<pack>/<name>.jpg
    assert thumb.is_file() and 1_000 < thumb.stat().st_size < 40_000, "make it: python tools/make_thumbnails.py"


def test_checker_catches_broken_layouts():
    graph = json.loads((ROOT / "example_workflows" / "text_to_image.json").read_text(encoding="utf-8"))
    assert layout.check(graph) == []
    moved = copy.deepcopy(graph)
    moved["nodes"][2]["pos"] = list(moved["nodes"][1]["pos"])  # two nodes on one spot
    assert any("overlap" in p for p in layout.check(moved))
    wide = copy.deepcopy(graph)
    wide["nodes"][-1]["pos"][0] += 3000  # far right: fitted zoom too small
    assert any("px at the fitted zoom" in p for p in layout.check(wide))
    assert any("saved view" in p for p in layout.check(wide))
