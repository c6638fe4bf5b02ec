"""generate / edit: round trips against the library, PNG parameters, --from-png, early checks.

``main(argv, pipeline=pipe)`` runs in-process on the session's tiny pipeline; only the tests of
model loading load a checkpoint again.
"""
from __future__ import annotations

import hashlib

import numpy as np
from cli_support import pixels, sha
from PIL import Image

from tbac_core import __version__
from tbac_core.cli import main
from tbac_core.io.pngmeta import read_parameters

STEPS = "3"


def test_generate_equals_library_call_and_records_parameters(pipe, tmp_path, capsys):
    argv = ["generate", "--prompt", "a red cat, sitting", "--negative-prompt", "blurry", "--seed", "7",
            "--steps", STEPS, "--guidance", "3.5", "--sampler", "euler", "--layers", "last 2",
            "--num-images", "2", "--out", str(tmp_path)]
    assert main(argv, pipeline=pipe) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "tbac_7_0.png"), str(tmp_path / "tbac_7_1.png")]

    expected = pipe.generate("a red cat, sitting", "blurry", seed=7, steps=3, guidance_scale=3.5, sampler="euler",
                             layers="last 2", num_images_per_prompt=2).images
    identity = pipe.model.identity
    config_sha256 = hashlib.sha256((pipe.model.checkpoint_dir / "config.json").read_bytes()).hexdigest()
    for index, image in enumerate(expected):
        path = tmp_path / f"tbac_7_{index}.png"
        np.testing.assert_array_equal(pixels(path), np.asarray(image))  # lossless, bit for bit
        assert read_parameters(path) == {
            "tbac_core_version": __version__, "mode": "generate", "prompt": "a red cat, sitting",
            "negative_prompt": "blurry", "seed": 7, "steps": 3, "guidance": 3.5, "image_guidance": None,
            "width": 64, "height": 64, "sampler": "euler", "layers": "last 2", "block_rungs": [4, 4, 5, 5],
            "num_images": 2, "image_index": index, "denoise": None, "init_image": None, "input_images": [],
            "model": {"name": identity.name, "fingerprint": identity.fingerprint, "dtype": "float32",
                      "config_sha256": config_sha256},
        }
    with Image.open(tmp_path / "tbac_7_1.png") as image:
        infotext = image.text["parameters"]
    assert infotext.splitlines()[:2] == ["a red cat, sitting", "Negative prompt: blurry"]
    assert "Steps: 3, Sampler: euler, CFG scale: 3.5, Seed: 7, Size: 64x64" in infotext
    assert f"Model hash: {identity.fingerprint[:10]}" in infotext and "Batch pos: 1" in infotext


def test_generate_never_overwrites(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "a house", "--steps", "2", "--out", str(tmp_path), "--prefix", "my run"]
    assert main(argv, pipeline=pipe) == 0
    first = (tmp_path / "my_run_0_0.png").read_bytes()
    assert main(argv + ["--width", "128"], pipeline=pipe) == 0
    assert (tmp_path / "my_run_0_0.png").read_bytes() == first
    assert read_parameters(tmp_path / "my_run_0_0-1.png")["width"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_run_0_0-1.png", "my_run_0_0.png"]  # no temp files


def test_image_to_image_equals_library_call(pipe, tmp_path, input_png, capsys):
    argv = ["generate", "-p", "a blue square", "--init-image", str(input_png), "--denoise", "0.5",
            "--steps", "4", "--seed", "3", "--out", str(tmp_path)]
    assert main(argv, pipeline=pipe) == 0
    with Image.open(input_png) as start:
        expected = pipe.generate("a blue square", init_image=start.convert("RGB"), denoise=0.5, steps=4, seed=3)
    np.testing.assert_array_equal(pixels(tmp_path / "tbac_3_0.png"), np.asarray(expected.images[0]))
    params = read_parameters(tmp_path / "tbac_3_0.png")
    assert params["mode"] == "img2img" and params["denoise"] == 0.5
    assert params["init_image"] == {"name": "edit_input_0.png", "sha256": sha(input_png)}


def test_edit_equals_library_call(pipe, tmp_path, input_png, capsys):
    argv = ["edit", "-p", "make the square blue", "--image", str(input_png), "--image", str(input_png),
            "--image-guidance", "1.2", "--steps", STEPS, "--seed", "5", "--out", str(tmp_path)]
    assert main(argv, pipeline=pipe) == 0
    with Image.open(input_png) as image:
        image = image.convert("RGB")
        expected = pipe.edit("make the square blue", images=[image, image], image_guidance_scale=1.2, steps=3, seed=5)
    np.testing.assert_array_equal(pixels(tmp_path / "tbac_5_0.png"), np.asarray(expected.images[0]))
    params = read_parameters(tmp_path / "tbac_5_0.png")
    assert params["mode"] == "edit" and params["image_guidance"] == 1.2
    assert params["input_images"] == [{"name": "edit_input_0.png", "sha256": sha(input_png)}] * 2


def test_edit_needs_an_image(pipe, tmp_path, capsys):
    assert main(["edit", "-p", "make it blue", "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "--image" in capsys.readouterr().err


def test_from_png_reproduces_an_output(pipe, tmp_path, input_png, capsys):
    argv = ["edit", "-p", "add a hat", "--image", str(input_png), "--seed", "11", "--steps", STEPS,
            "--guidance", "6", "--out", str(tmp_path)]
    assert main(argv, pipeline=pipe) == 0
    original = tmp_path / "tbac_11_0.png"
    again = ["edit", "--from-png", str(original), "--image", str(input_png), "--out", str(tmp_path), "--prefix", "again"]
    assert main(again, pipeline=pipe) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again_11_0.png"), pixels(original))
    assert read_parameters(tmp_path / "again_11_0.png") == read_parameters(original)
    # Flags override the stored values; an edit PNG is refused by generate with the command to use.
    assert main(again + ["--seed", "12"], pipeline=pipe) == 0
    assert read_parameters(tmp_path / "again_12_0.png")["guidance"] == 6.0
    capsys.readouterr()
    assert main(["generate", "--from-png", str(original), "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "edit --from-png" in capsys.readouterr().err


def test_bad_parameters_are_all_reported(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "x", "--width", "60", "--sampler", "ddim", "--layers", "99", "--steps", "0",
            "--out", str(tmp_path)]
    assert main(argv, pipeline=pipe) == 2
    err = capsys.readouterr().err
    # The core's own checks (tbac_core.params), with the model's latent factor from its config.json.
    assert "width: width=60 is not allowed: use a multiple of 8 (the VAE's latent factor)" in err
    assert "sampler: Unknown sampler 'ddim'; choose one of dpm++, euler" in err
    assert "layers:" in err and "99" in err
    assert "steps: steps must be an integer in 1..1000, got 0" in err
    assert not list(tmp_path.iterdir())
    assert main(["generate", "-p", "x", "--denoise", "0.5", "--out", str(tmp_path)], pipeline=pipe) == 2
    assert "--init-image" in capsys.readouterr().err


def test_checkpoint_sampling_defaults_apply_under_flags(tmp_path):
    """The demo checkpoint stores the settings it was tuned with; flags still win."""
    from tbac_core.cli.checkpoint_info import checkpoint_job_defaults
    from tbac_core.demo import DEMO_CHECKPOINT
    from tbac_core.pipeline.tbac_pipeline import TBACPipeline

    pipe = TBACPipeline.from_pretrained(DEMO_CHECKPOINT, device="cpu", dtype="fp32")
    assert checkpoint_job_defaults(pipe) == {"steps": 20, "guidance": 3.0, "sampler": "dpm++", "layers": "default"}
    assert main(["generate", "--prompt", "a red circle on a blue background", "--out", str(tmp_path)],
                pipeline=pipe) == 0
    from tbac_core.io.pngmeta import read_parameters

    stored = read_parameters(next(tmp_path.glob("*.png")))
    assert (stored["steps"], stored["guidance"]) == (20, 3.0)
    assert main(["generate", "--prompt", "x", "--steps", "3", "--out", str(tmp_path / "b")], pipeline=pipe) == 0
    assert read_parameters(next((tmp_path / "b").glob("*.png")))["steps"] == 3
