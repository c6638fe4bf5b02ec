"""``python -m tbac_core quantize``: writes a folder that ``--model`` loads; bad output folders exit 2."""
from __future__ import annotations

import pytest

from tbac_core.cli import main

pytest.importorskip("gguf")


def test_quantize_command_writes_a_loadable_fp8_folder(checkpoint_dir, fixture_root, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(checkpoint_dir), "--format", "fp8", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    from tbac_core.loading import load_model
    from tbac_core.quantization import FP8Linear

    model = load_model(out, device="cpu", dtype="float32", models_dirs=[fixture_root])
    assert isinstance(model.dit.transformer.transformer_blocks[0].attn1.to_v, FP8Linear)


def test_quantize_command_refuses_a_used_output_folder(checkpoint_dir, tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    assert main(["quantize", "--model", str(checkpoint_dir), "--format", "q8_0", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
