"""Packaging: `pip install .` gives the two libraries; the manifests agree with each other."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_pyproject_dependencies_mirror_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == sorted(_requirements(ROOT / "requirements.txt"))
    assert not any(req.lower().startswith("torch") for req in project["dependencies"])
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "peft" not in " ".join(project["dependencies"])  # training only: the 'train' extra
    assert any(req.startswith("peft") for req in project["optional-dependencies"]["train"])


def test_pip_install_gives_importable_libraries_outside_the_repository(tmp_path):
    """``pip install .`` (into a fresh target folder, without network: this interpreter's setuptools builds
    it) installs both libraries and the demo checkpoint; then ``import tbac_core`` and
    ``python -m comfy_queue --help`` work from a folder that is not the repository."""
    # Build from a copy of what a source distribution holds: setuptools writes build/ and *.egg-info
    # next to the sources, which must not land in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("tbac_core", "comfy_queue"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, timeout=300, env=env, cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env["PYTHONPATH"] = str(site)  # the installed copies only: the repository is not on the path
    probe = ("import tbac_core, comfy_queue; print(tbac_core.__file__); print(comfy_queue.__file__); "
             "from tbac_core.demo import DEMO_CHECKPOINT; print((DEMO_CHECKPOINT / 'config.json').is_file())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                            cwd=outside)
    assert result.returncode == 0, result.stderr
    core_file, queue_file, demo_ok = result.stdout.split()
    assert core_file.startswith(str(site)) and queue_file.startswith(str(site))
    assert demo_ok == "True"  # the demo checkpoint is package data
    assert not (site / "nodes").exists()  # the ComfyUI adapters are not a library
    help_run = subprocess.run([sys.executable, "-m", "comfy_queue", "--help"], capture_output=True, text=True,
                              timeout=120, env=env, cwd=outside)
    assert help_run.returncode == 0 and "usage" in help_run.stdout


def test_tests_run_from_a_clone_whose_folder_is_no_package_name(tmp_path):
    """``git clone`` names the folder after the repository (``TBAC-UniImage-...``, not a package name);
    pytest then imports the entry ``__init__.py`` without a package, which must not fail. ComfyUI always
    imports it as a package and gets the entry point."""
    clone = tmp_path / "TBAC-UniImage-ComfyUI"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "__init__.py", clone / "__init__.py")
    shutil.copy(ROOT / "pytest.ini", clone / "pytest.ini")
    (clone / "tests" / "test_one.py").write_text("def test_one():\n    assert True\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
