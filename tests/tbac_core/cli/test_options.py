"""Model options: where the model folder comes from, and the flags shared with ``train``.

``main(argv, pipeline=pipe)`` runs in-process on the session's tiny pipeline; only the tests of
model loading load a checkpoint again.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from cli_support import pixels

from tbac_core.cli import context, main
from tbac_core.cli.options import MODEL_ENV, resolve_model_dir
from tbac_core.errors import UsageError


def test_model_from_environment_with_memory_mode(pipe, checkpoint_dir, tmp_path, monkeypatch, capsys):
    """No pipeline given: $TBAC_MODEL is loaded (with --memory passed through) and gives the same image."""
    monkeypatch.setenv(MODEL_ENV, str(checkpoint_dir))
    loaded = []
    load = context.load_pipeline
    monkeypatch.setattr(context, "load_pipeline", lambda args, folder: loaded.append(load(args, folder)) or loaded[-1])
    argv = ["generate", "-p", "a red cat", "--steps", "2", "--memory", "sequential", "--device", "cpu",
            "--dtype", "fp32", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert loaded[0].placement.mode == "sequential"
    assert loaded[0].model.checkpoint_dir == checkpoint_dir
    expected = pipe.generate("a red cat", steps=2).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "tbac_0_0.png"), np.asarray(expected))


def test_weights_flag_quantises_while_loading(checkpoint_dir, tmp_path, monkeypatch, capsys):
    """``--weights q8_0`` loads the DiT's and MLLM's linears as GGML blocks; ``train`` has no such flag."""
    loaded = []
    load = context.load_pipeline
    monkeypatch.setattr(context, "load_pipeline", lambda args, folder: loaded.append(load(args, folder)) or loaded[-1])
    argv = ["generate", "-p", "a red cat", "--steps", "2", "--device", "cpu", "--dtype", "fp32",
            "--model", str(checkpoint_dir), "--weights", "q8_0", "--out", str(tmp_path)]
    assert main(argv) == 0
    layer = loaded[0].model.dit.transformer.transformer_blocks[0].attn1.to_q
    assert type(layer).__name__ == "GGUFLinear" and layer.format.name == "q8_0"
    assert (tmp_path / "tbac_0_0.png").is_file()
    capsys.readouterr()
    for argv in (["generate", "-p", "x", "--weights", "q3"],  # not a format
                 ["train", "--weights", "fp8", "--data", str(tmp_path), "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'q3'" in err and "unrecognized arguments: --weights" in err


def test_model_folder_resolution(checkpoint_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "elsewhere"))
    assert resolve_model_dir(str(checkpoint_dir)) == checkpoint_dir  # --model wins over the variable
    with pytest.raises(UsageError, match=r"\$TBAC_MODEL = .*does not exist"):
        resolve_model_dir(None)
    assert main(["generate", "-p", "x", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err

    # Neither given: the built-in demo model, or a clear error when it is not installed.
    monkeypatch.delenv(MODEL_ENV)
    monkeypatch.setitem(sys.modules, "tbac_core.demo", types.SimpleNamespace(DEMO_CHECKPOINT=checkpoint_dir))
    assert resolve_model_dir(None) == checkpoint_dir
    assert resolve_model_dir("demo") == checkpoint_dir
    monkeypatch.setitem(sys.modules, "tbac_core.demo", None)  # makes the import fail
    with pytest.raises(UsageError, match="demo model is not part of this installation.*--model"):
        resolve_model_dir(None)


def test_memory_and_dtype_choices_are_the_library_ones():
    from tbac_core.cli.options import model_options
    from tbac_core.params import DTYPE_CHOICES, MEMORY_MODES

    actions = {action.dest: action for action in model_options()._actions}
    assert tuple(actions["memory"].choices) == MEMORY_MODES and actions["memory"].default == MEMORY_MODES[0]
    assert tuple(actions["dtype"].choices) == DTYPE_CHOICES
    assert "compile" in actions and "compile" not in {a.dest for a in model_options(compile_option=False)._actions}
