"""The house rules of the layout, checked on the source: no import circle in the library, the ComfyUI
boundary in one module, nodes on public faces only, comfy_queue independent of tbac_core."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "tbac_core"
# What nodes may import from the library: its packages' faces and the three top-level modules.
TOP_LEVEL_FACES = {"tbac_core.params", "tbac_core.errors", "tbac_core.devices"}


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _imports(path: Path, module: str) -> list[str]:
    """Absolute names of everything ``path`` imports, at any depth (function-level imports count too)."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append(target)
            names.extend(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` may be a module
    return names


def _face_exports(path: Path, package: str) -> dict[str, str]:
    """name -> absolute module, from a lazy face's ``_EXPORTS = {".module": ("name", ...)}``."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            resolved = {}
            for module, names in table.items():
                dots = len(module) - len(module.lstrip("."))
                base = package.split(".")[: len(package.split(".")) - dots + 1]
                for name in names:
                    resolved[name] = ".".join(base + [module.lstrip(".")])
            return resolved
    return {}


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports; an import through a lazy face counts as an import of the module
    behind the name (a face must not hide a circle)."""
    paths = {_module_name(p, root, package): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    faces = {name: _face_exports(path, name) for name, path in paths.items() if path.name == "__init__.py"}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for target in _imports(path, name):
            face, _, attribute = target.rpartition(".")
            if face in faces and attribute in faces[face]:
                targets.add(faces[face][attribute])
            elif target in paths:
                targets.add(target)
        graph[name] = targets - {name}
    return graph


def test_the_library_has_no_import_circle():
    graph = _graph(CORE, "tbac_core")
    # A package's face imports nothing but _exports, so edges into a package are edges into its modules;
    # what remains must be a DAG.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_comfyui_nodes_or_the_queue():
    for path in CORE.rglob("*.py"):
        for target in _imports(path, _module_name(path, CORE, "tbac_core")):
            top = target.split(".")[0]
            assert top not in {"comfy", "comfy_api", "folder_paths", "nodes", "comfy_queue", "comfy_extras"}, (
                f"{path.relative_to(ROOT)} imports {target}")


def test_comfy_queue_is_standard_library_only_and_independent():
    import sys

    queue_root = ROOT / "comfy_queue"
    for path in queue_root.rglob("*.py"):
        for target in _imports(path, _module_name(path, queue_root, "comfy_queue")):
            top = target.split(".")[0]
            assert top in sys.stdlib_module_names or top in {"comfy_queue", "tqdm", "__future__", ""}, (
                f"{path.relative_to(ROOT)} imports {target}")


def test_nodes_use_the_bridge_for_comfyui_and_only_public_faces_of_the_library():
    faces = {"tbac_core"} | TOP_LEVEL_FACES | {
        _module_name(p, CORE, "tbac_core") for p in CORE.glob("*/__init__.py")}
    for path in (ROOT / "nodes").glob("*.py"):
        module = "pack." + _module_name(path, ROOT / "nodes", "nodes")
        for target in _imports(path, module):
            top = target.split(".")[0]
            if path.name != "comfy_bridge.py":
                assert top not in {"comfy", "comfy_api", "folder_paths", "comfy_extras"}, (
                    f"nodes/{path.name} imports {target}: ComfyUI is reached through nodes/comfy_bridge.py")
            assert top != "tbac_core", f"nodes/{path.name} imports {target} absolutely: use the pack's own copy"
            if target.startswith("pack.tbac_core"):
                name = target[len("pack."):]
                assert name in faces or name.rsplit(".", 1)[0] in faces, (
                    f"nodes/{path.name} imports {name}, which is not a public face ({sorted(faces)})")


def test_the_pack_entry_is_comfyui_only():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "NODE_CLASS_MAPPINGS" not in assigned  # ComfyUI would read the mappings and skip the entry point
    assert "sys" not in imported  # no sys.path edits: the pack uses its own tbac_core, found relatively
    assert any(isinstance(node, ast.AsyncFunctionDef) and node.name == "comfy_entrypoint" for node in tree.body)
