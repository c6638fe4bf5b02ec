"""batch: bad rows reported while the others render, resume, conditioning reuse, CSV.

``main(argv, pipeline=pipe)`` runs in-process on the session's tiny pipeline; only the tests of
model loading load a checkpoint again.
"""
from __future__ import annotations

import csv

import numpy as np
from cli_support import CountCalls, manifest, pixels, write_jsonl
from PIL import Image

from tbac_core.cli import main
from tbac_core.cli.batch import MANIFEST_NAME
from tbac_core.io.pngmeta import read_parameters

STEPS = "3"


def test_batch_reports_bad_rows_and_finishes_the_others(pipe, tmp_path, input_png, capsys):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)  # passes the checks, fails while encoding (smaller than the VAE factor)
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "cat", "prompt": "a red cat", "seed": 1},
        {"id": "bad sampler", "prompt": "x", "sampler": "ddim"},
        {"prompt": "x", "width": 100, "promt": "typo"},
        {"id": "tiny", "prompt": "x", "init_image": "tiny.png"},
        {"id": "edit", "prompt": "make it blue", "images": [str(input_png)], "num_images": 2, "seed": 4},
    ])
    out = tmp_path / "out"
    assert main(["batch", str(rows), "--out", str(out), "--steps", STEPS], pipeline=pipe) == 1
    err = capsys.readouterr().err
    assert "row 2 (rows.jsonl line 2, id bad_sampler) failed" in err
    assert "sampler: Unknown sampler 'ddim'; choose one of dpm++, euler" in err
    assert "row 3 (rows.jsonl line 3, id row0003) failed" in err and "did you mean 'prompt'" in err
    assert "width: width=100 is not allowed: use a multiple of 8" in err
    assert "row 4 (rows.jsonl line 4, id tiny) failed" in err
    assert "2 done, 0 skipped (already rendered), 3 failed" in err

    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "cat_0.png", "edit_0.png", "edit_1.png"]
    records = {r["id"]: r for r in manifest(out)}
    assert records["cat"]["status"] == "done" and records["cat"]["outputs"] == ["cat_0.png"]
    assert records["edit"]["outputs"] == ["edit_0.png", "edit_1.png"] and records["edit"]["seconds"] > 0
    assert {records[k]["status"] for k in ("bad_sampler", "row0003", "tiny")} == {"failed"}
    assert "InvalidParameterError" in records["tiny"]["error"]

    np.testing.assert_array_equal(pixels(out / "cat_0.png"), np.asarray(pipe.generate("a red cat", seed=1, steps=3).images[0]))
    with Image.open(input_png) as image:
        edited = pipe.edit("make it blue", images=[image.convert("RGB")], seed=4, steps=3, num_images_per_prompt=2)
    for k in range(2):
        np.testing.assert_array_equal(pixels(out / f"edit_{k}.png"), np.asarray(edited.images[k]))
        assert read_parameters(out / f"edit_{k}.png")["image_index"] == k


def test_batch_resume_skips_done_rows(pipe, tmp_path, monkeypatch, capsys):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    argv = ["batch", str(path), "--out", str(out), "--steps", "2"]
    assert main(argv, pipeline=pipe) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    sampled = CountCalls(monkeypatch, pipe, "run_sampler")
    encoded = CountCalls(monkeypatch, pipe.model, "encode")
    assert main(argv, pipeline=pipe) == 0
    assert (sampled.calls, encoded.calls) == (0, 0)  # nothing ran again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert [r["status"] for r in manifest(out)[-3:]] == ["skipped"] * 3

    # A deleted output, a changed row and a leftover temp file of a killed run: only those rows run.
    (out / "r0_0.png").unlink()
    (out / ".r2_0.png.1234abcd.part").write_bytes(b"half a file")
    rows[1]["seed"] = 99
    write_jsonl(path, rows)
    assert main(argv, pipeline=pipe) == 0
    assert sampled.calls == 2
    assert read_parameters(out / "r1_0.png")["seed"] == 99
    assert {r["id"]: r["status"] for r in manifest(out)[-3:]} == {"r0": "done", "r1": "done", "r2": "skipped"}
    capsys.readouterr()
    # --force renders everything again.
    assert main(argv + ["--force"], pipeline=pipe) == 0
    assert sampled.calls == 5


def test_batch_reuses_conditioning_of_consecutive_rows(pipe, tmp_path, input_png, monkeypatch, capsys):
    pipe.clear_cache()
    encoded = CountCalls(monkeypatch, pipe.model, "encode")
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "a lighthouse at dusk", "seed": 1},
        {"prompt": "a lighthouse at dusk", "seed": 2, "steps": 2, "guidance": 7},
        {"prompt": "a lighthouse at dusk", "seed": 3, "width": 128},
        {"prompt": "a lighthouse at dusk", "seed": 3, "negative_prompt": "fog"},  # new negative: new encode
        {"prompt": "turn it blue", "images": [str(input_png)], "seed": 1},
        {"prompt": "turn it blue", "images": [str(input_png)], "seed": 2},
    ])
    assert main(["batch", str(rows), "--out", str(tmp_path / "out"), "--steps", "2"], pipeline=pipe) == 0
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
    assert main(["batch", str(path), "--out", str(out), "--steps", "3", "--guidance", "4"], pipeline=pipe) == 1
    err = capsys.readouterr().err
    assert "row 3 (rows.csv line 4, id row0003) failed" in err and "seed: expected a whole number, got 'nine'" in err

    expected = pipe.generate("a purple sky", seed=8, steps=3, guidance_scale=4.0, layers="all").images[0]
    np.testing.assert_array_equal(pixels(out / "sky_0.png"), np.asarray(expected))
    with Image.open(input_png) as image:
        image = image.convert("RGB")
        edited = pipe.edit("swap the colours", images=[image, image], seed=9, steps=2, guidance_scale=5.5).images[0]
    np.testing.assert_array_equal(pixels(out / "two_0.png"), np.asarray(edited))
    params = read_parameters(out / "two_0.png")
    assert (params["steps"], params["guidance"], params["layers"]) == (2, 5.5, "default")
    assert [item["name"] for item in params["input_images"]] == ["a.png", "a.png"]


def test_batch_rerun_when_all_done_does_not_load_the_model(pipe, checkpoint_dir, tmp_path, monkeypatch, capsys):
    from tbac_core.cli import context

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"p {i}", "seed": i} for i in range(2)])
    out = tmp_path / "out"
    argv = ["batch", str(rows), "--out", str(out), "--steps", "2", "--model", str(checkpoint_dir)]
    assert main(argv, pipeline=pipe) == 0

    def refuse(args, folder):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(context, "load_pipeline", refuse)
    assert main(argv) == 0
    assert [r["status"] for r in manifest(out)[-2:]] == ["skipped", "skipped"]
    # One changed row: now the model is needed.
    write_jsonl(rows, [{"id": "r0", "prompt": "p 0", "seed": 0}, {"id": "r1", "prompt": "p 1", "seed": 5}])
    monkeypatch.setattr(context, "load_pipeline", lambda args, folder: pipe)
    assert main(argv) == 0
    assert {r["id"]: r["status"] for r in manifest(out)[-2:]} == {"r0": "skipped", "r1": "done"}


def test_batch_skips_rows_with_unusable_ids_and_goes_on(pipe, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "x" * 300, "prompt": "too long a name"},
        {"id": "ok", "prompt": "fine"},
        {"id": "\0\0", "prompt": "only NUL bytes"},
        {"id": "bad", "prompt": "x", "steps": "many", "guidance": [1], "init_image": "a\0b.png"},
        {"id": "deep", "prompt": "x", "layers": [[[[1]]]]},
    ])
    (tmp_path / "rows.jsonl").write_text(rows.read_text() + "[" * 3000 + "]" * 3000 + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(rows), "--out", str(out), "--steps", "2"], pipeline=pipe) == 1
    err = capsys.readouterr().err
    assert "id: id 'xxxxxxxx" in err and "at most 255 bytes" in err
    assert "gives an empty file name" in err
    assert "steps: expected a whole number, got 'many'" in err and "guidance: expected a number" in err
    assert "NUL byte" in err
    assert "nested 3000 levels deep" in err
    assert "1 done, 0 skipped (already rendered), 5 failed" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["ok_0.png"]
