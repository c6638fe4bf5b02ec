"""The entry point: ``python -m tbac_core``, exit codes, fast start, errors before the model loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_module_entry_point(tmp_path):
    """``python -m tbac_core`` runs ``cli.main`` and returns its exit status (no model is loaded here)."""
    run = subprocess.run([sys.executable, "-m", "tbac_core", "batch", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "Cannot read the rows file" in run.stderr
    run = subprocess.run([sys.executable, "-m", "tbac_core", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0 and all(name in run.stdout for name in ("generate", "edit", "understand", "batch"))
