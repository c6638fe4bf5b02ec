"""The command line (``python -m tbac_core``): round trips against the library, PNG parameters, batch.

``cli.main(argv, pipeline=pipe)`` runs in-process on the session's tiny pipeline; only the tests
of model loading load the checkpoint again.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from tbac_core import __version__
from tbac_core.cli import main as cli
from tbac_core.io.pngmeta import read_parameters

STEPS = "3"


@pytest.fixture(scope="module")
def input_png(fixture_root):
    return fixture_root / "goldens" / "edit_input_0.png"


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / cli.MANIFEST_NAME).read_text().splitlines()]


class CountCalls:
    """Wraps a bound method and counts its calls (MLLM encodes, samplings)."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


# -- generate / edit -----------------------------------------------------------------------------


def test_generate_equals_library_call_and_records_parameters(pipe, tmp_path, capsys):
    argv = ["generate", "--prompt", "a red cat, sitting", "--negative-prompt", "blurry", "--seed", "7",
            "--steps", STEPS, "--guidance", "3.5", "--sampler", "euler", "--layers", "last 2",
            "--num-images", "2", "--out", str(tmp_path)]
    assert cli.main(argv, pipeline=pipe) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "tbac_7_0.png"), str(tmp_path / "tbac_7_1.png")]

    expected = pipe.generate("a red cat, sitting", "blurry", seed=7, steps=3, guidance_scale=3.5, sampler="euler",
                             layers="last 2", num_images_per_prompt=2).images
    identity = pipe.model.identity
    for index, image in enumerate(expected):
        path = tmp_path / f"tbac_7_{index}.png"
        np.testing.assert_array_equal(_pixels(path), np.asarray(image))  # lossless, bit for bit
        assert read_parameters(path) == {
            "tbac_core_version": __version__, "mode": "generate", "prompt": "a red cat, sitting",
            "negative_prompt": "blurry", "seed": 7, "steps": 3, "guidance": 3.5, "image_guidance": None,
            "width": 64, "height": 64, "sampler": "euler", "layers": "last 2", "block_rungs": [4, 4, 5, 5],
            "num_images": 2, "image_index": index, "denoise": None, "init_image": None, "input_images": [],
            "model": {"name": identity.name, "fingerprint": identity.fingerprint, "dtype": "float32"},
        }
    with Image.open(tmp_path / "tbac_7_1.png") as image:
        infotext = image.text["parameters"]
    assert infotext.splitlines()[:2] == ["a red cat, sitting", "Negative prompt: blurry"]
    assert "Steps: 3, Sampler: euler, CFG scale: 3.5, Seed: 7, Size: 64x64" in infotext
    assert f"Model hash: {identity.fingerprint[:10]}" in infotext and "Batch pos: 1" in infotext


def test_generate_never_overwrites(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "a house", "--steps", "2", "--out", str(tmp_path), "--prefix", "my run"]
    assert cli.main(argv, pipeline=pipe) == 0
    first = (tmp_path / "my_run_0_0.png").read_bytes()
    assert cli.main(argv + ["--width", "128"], pipeline=pipe) == 0
    assert (tmp_path / "my_run_0_0.png").read_bytes() == first
    assert read_parameters(tmp_path / "my_run_0_0-1.png")["width"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_run_0_0-1.png", "my_run_0_0.png"]  # no temp files


def test_image_to_image_equals_library_call(pipe, tmp_path, input_png, capsys):
    argv = ["generate", "-p", "a blue square", "--init-image", str(input_png), "--denoise", "0.5",
            "--steps", "4", "--seed", "3", "--out", str(tmp_path)]
    assert cli.main(argv, pipeline=pipe) == 0
    with Image.open(input_png) as start:
        expected = pipe.generate("a blue square", init_image=start.convert("RGB"), denoise=0.5, steps=4, seed=3)
    np.testing.assert_array_equal(_pixels(tmp_path / "tbac_3_0.png"), np.asarray(expected.images[0]))
    params = read_parameters(tmp_path / "tbac_3_0.png")
    assert params["mode"] == "img2img" and params["denoise"] == 0.5
    assert params["init_image"] == {"name": "edit_input_0.png", "sha256": _sha(input_png)}


def test_edit_equals_library_call(pipe, tmp_path, input_png, capsys):
    argv = ["edit", "-p", "make the square blue", "--image", str(input_png), "--image", str(input_png),
            "--image-guidance", "1.2", "--steps", STEPS, "--seed", "5", "--out", str(tmp_path)]
    assert cli.main(argv, pipeline=pipe) == 0
    with Image.open(input_png) as image:
        image = image.convert("RGB")
        expected = pipe.edit("make the square blue", images=[image, image], image_guidance_scale=1.2, steps=3, seed=5)
    np.testing.assert_array_equal(_pixels(tmp_path / "tbac_5_0.png"), np.asarray(expected.images[0]))
    params = read_parameters(tmp_path / "tbac_5_0.png")
    assert params["mode"] == "edit" and params["image_guidance"] == 1.2
    assert params["input_images"] == [{"name": "edit_input_0.png", "sha256": _sha(input_png)}] * 2


def test_edit_needs_an_image(pipe, tmp_path, capsys):
    assert cli.main(["edit", "-p", "make it blue", "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "--image" in capsys.readouterr().err


def test_from_png_reproduces_an_output(pipe, tmp_path, input_png, capsys):
    argv = ["edit", "-p", "add a hat", "--image", str(input_png), "--seed", "11", "--steps", STEPS,
            "--guidance", "6", "--out", str(tmp_path)]
    assert cli.main(argv, pipeline=pipe) == 0
    original = tmp_path / "tbac_11_0.png"
    again = ["edit", "--from-png", str(original), "--image", str(input_png), "--out", str(tmp_path), "--prefix", "again"]
    assert cli.main(again, pipeline=pipe) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "again_11_0.png"), _pixels(original))
    assert read_parameters(tmp_path / "again_11_0.png") == read_parameters(original)
    # Flags override the stored values; an edit PNG is refused by generate with the command to use.
    assert cli.main(again + ["--seed", "12"], pipeline=pipe) == 0
    assert read_parameters(tmp_path / "again_12_0.png")["guidance"] == 6.0
    capsys.readouterr()
    assert cli.main(["generate", "--from-png", str(original), "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "edit --from-png" in capsys.readouterr().err


def test_bad_parameters_are_all_reported(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "x", "--width", "60", "--sampler", "ddim", "--layers", "99", "--steps", "0",
            "--out", str(tmp_path)]
    assert cli.main(argv, pipeline=pipe) == 2
    err = capsys.readouterr().err
    assert "width: 60 is not allowed; use a multiple of 8" in err
    assert "sampler: unknown sampler 'ddim'; allowed: dpm++, euler" in err
    assert "layers:" in err and "99" in err
    assert "steps: 0 is out of range" in err
    assert not list(tmp_path.iterdir())
    assert cli.main(["generate", "-p", "x", "--denoise", "0.5", "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "--init-image" in capsys.readouterr().err


# -- model loading ---------------------------------------------------------------------------------


def test_model_from_environment_with_memory_mode(pipe, checkpoint_dir, tmp_path, monkeypatch, capsys):
    """No pipeline given: $TBAC_MODEL is loaded (with --memory passed through) and gives the same image."""
    monkeypatch.setenv(cli.MODEL_ENV, str(checkpoint_dir))
    loaded = []
    load = cli.load_pipeline
    monkeypatch.setattr(cli, "load_pipeline", lambda args: loaded.append(load(args)) or loaded[-1])
    argv = ["generate", "-p", "a red cat", "--steps", "2", "--memory", "sequential", "--device", "cpu",
            "--dtype", "fp32", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert loaded[0].placement.mode == "sequential"
    assert loaded[0].model.checkpoint_dir == checkpoint_dir
    expected = pipe.generate("a red cat", steps=2).images[0]
    np.testing.assert_array_equal(_pixels(tmp_path / "tbac_0_0.png"), np.asarray(expected))


def test_model_folder_resolution(checkpoint_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cli.MODEL_ENV, str(tmp_path / "elsewhere"))
    assert cli.resolve_model_dir(str(checkpoint_dir)) == checkpoint_dir  # --model wins over the variable
    with pytest.raises(cli.UsageError, match=r"\$TBAC_MODEL = .*does not exist"):
        cli.resolve_model_dir(None)
    assert cli.main(["generate", "-p", "x", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err

    # Neither given: the built-in demo model, or a clear error when it is not installed.
    monkeypatch.delenv(cli.MODEL_ENV)
    monkeypatch.setitem(sys.modules, "tbac_core.demo", types.SimpleNamespace(DEMO_CHECKPOINT=checkpoint_dir))
    assert cli.resolve_model_dir(None) == checkpoint_dir
    assert cli.resolve_model_dir("demo") == checkpoint_dir
    monkeypatch.setitem(sys.modules, "tbac_core.demo", None)  # makes the import fail
    with pytest.raises(cli.UsageError, match="demo model is not part of this installation.*--model"):
        cli.resolve_model_dir(None)


def test_memory_choices_are_library_modes():
    from tbac_core.params import MEMORY_MODES

    assert set(cli.MEMORY_CHOICES) <= set(MEMORY_MODES)


# -- understand ------------------------------------------------------------------------------------


def test_understand_prints_the_answer(pipe, input_png, capsys):
    from tbac_core.params import GenerationSettings
    from tbac_core.pipeline.understanding import answer

    argv = ["understand", "--image", str(input_png), "--question", "What is red?", "--max-new-tokens", "6"]
    assert cli.main(argv, pipeline=pipe) == 0
    printed = capsys.readouterr().out
    with Image.open(input_png) as image:
        expected = answer(pipe, "What is red?", images=[image.convert("RGB")],
                          settings=GenerationSettings(max_new_tokens=6))
    assert printed == expected + "\n" and expected.strip()
    assert cli.main(["understand", "--preset", "no such preset"], pipeline=pipe) == 2
    assert "short caption" in capsys.readouterr().err  # the error lists the presets


# -- batch -----------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_batch_reports_bad_rows_and_finishes_the_others(pipe, tmp_path, input_png, capsys):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)  # passes the checks, fails while encoding (smaller than the VAE factor)
    rows = _write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "cat", "prompt": "a red cat", "seed": 1},
        {"id": "bad sampler", "prompt": "x", "sampler": "ddim"},
        {"prompt": "x", "width": 100, "promt": "typo"},
        {"id": "tiny", "prompt": "x", "init_image": "tiny.png"},
        {"id": "edit", "prompt": "make it blue", "images": [str(input_png)], "num_images": 2, "seed": 4},
    ])
    out = tmp_path / "out"
    assert cli.main(["batch", str(rows), "--out", str(out), "--steps", STEPS], pipeline=pipe) == 1
    err = capsys.readouterr().err
    assert "row 2 (rows.jsonl line 2, id bad_sampler) failed" in err
    assert "sampler: unknown sampler 'ddim'; allowed: dpm++, euler" in err
    assert "row 3 (rows.jsonl line 3, id row0003) failed" in err and "did you mean 'prompt'" in err
    assert "width: 100 is not allowed; use a multiple of 8" in err
    assert "row 4 (rows.jsonl line 4, id tiny) failed" in err
    assert "2 done, 0 skipped (already rendered), 3 failed" in err

    assert sorted(p.name for p in out.iterdir()) == [cli.MANIFEST_NAME, "cat_0.png", "edit_0.png", "edit_1.png"]
    records = {r["id"]: r for r in _manifest(out)}
    assert records["cat"]["status"] == "done" and records["cat"]["outputs"] == ["cat_0.png"]
    assert records["edit"]["outputs"] == ["edit_0.png", "edit_1.png"] and records["edit"]["seconds"] > 0
    assert {records[k]["status"] for k in ("bad_sampler", "row0003", "tiny")} == {"failed"}
    assert "InvalidParameterError" in records["tiny"]["error"]

    np.testing.assert_array_equal(_pixels(out / "cat_0.png"), np.asarray(pipe.generate("a red cat", seed=1, steps=3).images[0]))
    with Image.open(input_png) as image:
        edited = pipe.edit("make it blue", images=[image.convert("RGB")], seed=4, steps=3, num_images_per_prompt=2)
    for k in range(2):
        np.testing.assert_array_equal(_pixels(out / f"edit_{k}.png"), np.asarray(edited.images[k]))
        assert read_parameters(out / f"edit_{k}.png")["image_index"] == k


def test_batch_resume_skips_done_rows(pipe, tmp_path, monkeypatch, capsys):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    argv = ["batch", str(path), "--out", str(out), "--steps", "2"]
    assert cli.main(argv, pipeline=pipe) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    sampled = CountCalls(monkeypatch, pipe, "sample")
    encoded = CountCalls(monkeypatch, pipe.model, "encode")
    assert cli.main(argv, pipeline=pipe) == 0
    assert (sampled.calls, encoded.calls) == (0, 0)  # nothing ran again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert [r["status"] for r in _manifest(out)[-3:]] == ["skipped"] * 3

    # A deleted output, a changed row and a leftover temp file of a killed run: only those rows run.
    (out / "r0_0.png").unlink()
    (out / ".r2_0.png.1234abcd.part").write_bytes(b"half a file")
    rows[1]["seed"] = 99
    _write_jsonl(path, rows)
    assert cli.main(argv, pipeline=pipe) == 0
    assert sampled.calls == 2
    assert read_parameters(out / "r1_0.png")["seed"] == 99
    assert {r["id"]: r["status"] for r in _manifest(out)[-3:]} == {"r0": "done", "r1": "done", "r2": "skipped"}
    capsys.readouterr()
    # --force renders everything again.
    assert cli.main(argv + ["--force"], pipeline=pipe) == 0
    assert sampled.calls == 5


def test_batch_reuses_conditioning_of_consecutive_rows(pipe, tmp_path, input_png, monkeypatch, capsys):
    pipe.clear_cache()
    encoded = CountCalls(monkeypatch, pipe.model, "encode")
    rows = _write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "a lighthouse at dusk", "seed": 1},
        {"prompt": "a lighthouse at dusk", "seed": 2, "steps": 2, "guidance": 7},
        {"prompt": "a lighthouse at dusk", "seed": 3, "width": 128},
        {"prompt": "a lighthouse at dusk", "seed": 3, "negative_prompt": "fog"},  # new negative: new encode
        {"prompt": "turn it blue", "images": [str(input_png)], "seed": 1},
        {"prompt": "turn it blue", "images": [str(input_png)], "seed": 2},
    ])
    assert cli.main(["batch", str(rows), "--out", str(tmp_path / "out"), "--steps", "2"], pipeline=pipe) == 0
    assert encoded.calls == 3
    assert len(list((tmp_path / "out").glob("*.png"))) == 6


def test_batch_csv(pipe, tmp_path, input_png, capsys):
    images_dir = tmp_path / "inputs"
    images_dir.mkdir()
    (images_dir / "a.png").write_bytes(input_png.read_bytes())
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "prompt", "seed", "steps", "guidance", "images", "layers", "_note"])
        writer.writerow(["sky", "a purple sky", "8", "", "", "", "all", "steps/guidance from the flags"])
        writer.writerow(["two", "swap the colours", "9", "2", "5.5", "inputs/a.png;inputs/a.png", "", ""])
        writer.writerow(["", "x", "nine", "", "", "", "", ""])
    out = tmp_path / "out"
    assert cli.main(["batch", str(path), "--out", str(out), "--steps", "3", "--guidance", "4"], pipeline=pipe) == 1
    err = capsys.readouterr().err
    assert "row 3 (rows.csv line 4, id row0003) failed" in err and "seed: expected a whole number, got 'nine'" in err

    expected = pipe.generate("a purple sky", seed=8, steps=3, guidance_scale=4.0, layers="all").images[0]
    np.testing.assert_array_equal(_pixels(out / "sky_0.png"), np.asarray(expected))
    with Image.open(input_png) as image:
        image = image.convert("RGB")
        edited = pipe.edit("swap the colours", images=[image, image], seed=9, steps=2, guidance_scale=5.5).images[0]
    np.testing.assert_array_equal(_pixels(out / "two_0.png"), np.asarray(edited))
    params = read_parameters(out / "two_0.png")
    assert (params["steps"], params["guidance"], params["layers"]) == (2, 5.5, "default")
    assert [item["name"] for item in params["input_images"]] == ["a.png", "a.png"]


def test_read_rows_problems(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '# a comment\n'
        '{"id": "a", "prompt": "x", "steps": 2.0, "layers": [2, 3], "guidance_scale": "5"}\n'
        '{"id": "a", "prompt": "y"}\n'
        'not json\n'
        '[1, 2]\n'
        '{"prompt": "z", "seed": true, "steps": "3.5", "images": 5, "sizes": 3}\n'
    )
    rows = cli.read_rows(path)
    assert [r.where for r in rows] == [f"rows.jsonl line {n}" for n in (2, 3, 4, 5, 6)]
    assert rows[0].values == {"prompt": "x", "steps": 2, "layers": "2,3", "guidance": 5.0} and not rows[0].problems
    assert "already used by row 1" in rows[1].problems[0][1]
    assert "not valid JSON" in rows[2].problems[0][1]
    assert "expected a JSON object" in rows[3].problems[0][1]
    problems = dict(rows[4].problems)
    assert problems["seed"] == "expected a number, got True"
    assert problems["steps"] == "expected a whole number, got '3.5'"
    assert "image paths" in problems["images"]
    assert "unknown field (did you mean 'seed'?)" in problems["sizes"] or "unknown field" in problems["sizes"]
    assert "allowed: prompt, negative_prompt" in problems["sizes"]
    with pytest.raises(cli.UsageError, match="Cannot read the rows file"):
        cli.read_rows(tmp_path / "missing.csv")


def test_module_entry_point(tmp_path):
    """``python -m tbac_core`` runs ``cli.main`` and returns its exit status (no model is loaded here)."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "tbac_core", "batch", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True, cwd=cli.Path(cli.__file__).parents[2], timeout=120)
    assert run.returncode == 2 and "Cannot read the rows file" in run.stderr
    run = subprocess.run([sys.executable, "-m", "tbac_core", "--help"], capture_output=True, text=True,
                         cwd=cli.Path(cli.__file__).parents[2], timeout=120)
    assert run.returncode == 0 and all(name in run.stdout for name in ("generate", "edit", "understand", "batch"))


def test_pngmeta_round_trip_and_refusals(tmp_path):
    from tbac_core.io.pngmeta import (
        INFOTEXT_KEY,
        PNGMetadataError,
        encode_png,
        format_infotext,
    )

    params = {"prompt": "ein Hund im Schnee, 雪", "negative_prompt": "", "seed": 2**63, "steps": 2, "guidance": 4.5,
              "width": 64, "height": 32, "sampler": "dpm++", "layers": "16-35:2, final", "image_index": 0,
              "model": {"name": "m", "fingerprint": "abcdef0123456789"}, "tbac_core_version": "0.1.0"}
    image = Image.fromarray(np.arange(64 * 32 * 3, dtype=np.uint8).reshape(32, 64, 3))
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(image, params))
    assert read_parameters(path) == params
    np.testing.assert_array_equal(_pixels(path), np.asarray(image))
    with Image.open(path) as opened:
        assert opened.text[INFOTEXT_KEY] == format_infotext({"schema": 1, **params})
    assert format_infotext(params).splitlines() == [
        "ein Hund im Schnee, 雪",  # no negative prompt line when it is empty
        'Steps: 2, Sampler: dpm++, CFG scale: 4.5, Seed: 9223372036854775808, Size: 64x32, Model: m, '
        'Model hash: abcdef0123, Layers: "16-35:2, final", Batch pos: 0, Version: tbac_core 0.1.0',
    ]
    image.save(tmp_path / "plain.png")
    with pytest.raises(PNGMetadataError, match="no 'tbac_parameters' text chunk"):
        read_parameters(tmp_path / "plain.png")
    image.save(tmp_path / "b.jpg")
    with pytest.raises(PNGMetadataError, match="JPEG file, not a PNG"):
        read_parameters(tmp_path / "b.jpg")


def test_checkpoint_sampling_defaults_apply_under_flags(tmp_path):
    """The demo checkpoint stores the settings it was tuned with; flags still win."""
    from tbac_core.cli.main import checkpoint_job_defaults
    from tbac_core.demo import DEMO_CHECKPOINT
    from tbac_core.pipeline.tbac_pipeline import TBACPipeline

    pipe = TBACPipeline.from_pretrained(DEMO_CHECKPOINT, device="cpu", dtype="fp32")
    assert checkpoint_job_defaults(pipe) == {"steps": 20, "guidance": 3.0, "sampler": "dpm++", "layers": "default"}
    assert cli.main(["generate", "--prompt", "a red circle on a blue background", "--out", str(tmp_path)],
                pipeline=pipe) == 0
    from tbac_core.io.pngmeta import read_parameters

    stored = read_parameters(next(tmp_path.glob("*.png")))
    assert (stored["steps"], stored["guidance"]) == (20, 3.0)
    assert cli.main(["generate", "--prompt", "x", "--steps", "3", "--out", str(tmp_path / "b")], pipeline=pipe) == 0
    assert read_parameters(next((tmp_path / "b").glob("*.png")))["steps"] == 3
