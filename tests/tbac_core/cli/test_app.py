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


def _run(*argv, env=None, timeout=60):
    import os

    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_and_parser_do_not_import_torch():
    """Building every sub-command's parser (train included) imports no torch, transformers or diffusers."""
    code = ("import sys; from tbac_core.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'peft', 'tbac_core.training.trainer') "
            "if m in sys.modules))")
    run = _run("-c", code)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr
    for argv in (["--help"], ["generate", "--help"], ["train", "--help"]):
        run = _run("-m", "tbac_core", *argv)
        assert run.returncode == 0 and "usage:" in run.stdout


def test_help_shows_the_defaults_that_apply():
    from tbac_core.demo import demo_defaults

    run = _run("-m", "tbac_core", "generate", "--help")
    text = " ".join(run.stdout.split())
    assert f"(demo: {demo_defaults()['steps']})" in text and f"(demo: {demo_defaults()['guidance_scale']})" in text
    assert "--compile" in text
    run = _run("-m", "tbac_core", "understand", "--help")
    assert "--compile" not in run.stdout


def _loads_no_model(monkeypatch):
    from tbac_core.cli import context

    def refuse(args, folder):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(context, "load_pipeline", refuse)


def test_bad_inputs_fail_before_the_model_loads(checkpoint_dir, tmp_path, monkeypatch, capsys):
    """Every entry point checks image paths, values and the model folder from config.json alone."""
    import os

    from tbac_core.cli import main

    _loads_no_model(monkeypatch)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    model = ["--model", str(checkpoint_dir)]
    cases = [
        (["generate", "-p", "x", "--init-image", "/dev/zero"], "not a regular file"),
        (["generate", "-p", "x", "--init-image", str(fifo)], "not a regular file"),
        (["edit", "-p", "x", "--image", str(tmp_path)], "is a folder"),
        (["edit", "-p", "x", "--image", str(tmp_path / "missing.png")], "no such image file"),
        (["understand", "--image", str(fifo)], "--image: "),
        (["understand", "--image", "/dev/zero"], "not a regular file"),
        (["understand", "--image", str(tmp_path / "missing.png")], "no such image file"),
        (["generate", "-p", "x", "--from-png", str(fifo)], "--from-png: "),
        (["generate", "-p", "x", "--width", "60"], "width=60 is not allowed: use a multiple of 8"),  # the tiny model's factor
        (["generate", "-p", "x", "--steps", "0", "--seed", "-1"], "seed must be an integer"),
        (["generate", "-p", "x", "--prefix", "p" * 300], "at most 255 bytes"),
    ]
    for argv, message in cases:
        out = ["--out", str(tmp_path / "out")] if argv[0] != "understand" else []
        assert main([*argv, *model, *out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["generate", "-p", "x", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[" * 5000 + "]" * 5000)
    assert main(["generate", "-p", "x", "--model", str(broken)]) == 2
    assert "nested 5000 levels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_flag_and_missing_image_are_fast(tmp_path):
    import time

    for argv, message in ((["generate", "--bogus"], "unrecognized arguments"),
                          (["understand", "--image", str(tmp_path / "no.png")], "no such image file"),
                          (["generate", "-p", "x", "--init-image", str(tmp_path / "no.png")], "no such image file")):
        started = time.perf_counter()
        run = _run("-m", "tbac_core", *argv)
        assert run.returncode == 2 and message in run.stderr
        assert time.perf_counter() - started < 10  # 2 s on an idle machine; generous for a shared CI box


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    from tbac_core.cli import main
    from tbac_core.cli.commands import understand

    def boom(ctx):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(understand, "run_understand", boom)  # the handler the parser registers
    assert main(["understand"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: RuntimeError: something broke  (--debug shows the traceback)"]
    assert main(["understand", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "error: RuntimeError: something broke" in err
