"""bench/side_by_side.py without the official checkout: a stand-in official folder, our side for real."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "side_by_side.py"

# A stand-in for the official checkout: the files the script checks for, and a pipeline that answers
# the way the official one is called in app.py (and refuses any other call).
FAKE_PIPELINE = '''
import numpy as np
import torch
from PIL import Image

class _Output:
    def __init__(self, images):
        self.images = images

class TBACUniImagePipeline:
    @classmethod
    def from_pretrained(cls, path, ignore_mismatched_sizes, _gradient_checkpointing, torch_dtype):
        import os
        assert os.path.isfile(os.path.join(path, "config.json")), path  # found from the official worker's directory
        assert ignore_mismatched_sizes is True and _gradient_checkpointing is False
        assert torch_dtype in (torch.bfloat16, torch.float32)
        return cls()

    def to(self, device, dtype):
        assert device == "cpu"
        return self

    def __call__(self, caption, image, negative_prompt, guidance_scale, image_guidance_scale, generator,
                 num_inference_steps, num_images_per_prompt):
        assert image is None or (len(image) == 1 and isinstance(image[0][0], Image.Image))
        assert isinstance(generator, torch.Generator) and num_images_per_prompt == 1
        return _Output([Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))])
'''


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def test_wrong_official_folder_is_refused_clearly(tmp_path):
    done = run("--official", tmp_path, "--out", tmp_path, timeout=120)
    assert done.returncode == 2
    assert "is not a checkout of the official implementation" in done.stderr
    assert "pipeline.py" in done.stderr and str(tmp_path) in done.stderr
    done = run("--official", tmp_path / "nowhere", "--out", tmp_path, timeout=120)
    assert done.returncode == 2 and "no such folder" in done.stderr
    done = run("--out", tmp_path, timeout=120)
    assert done.returncode == 2 and "--official PATH is needed" in done.stderr
    done = run("--sides", "ours", "--accelerated", "cache=0.2", "--out", tmp_path, timeout=120)
    assert done.returncode == 2 and "--accelerated: 'cache=0.2': use key=value with a key of" in done.stderr


def stand_in_official_and_models(tmp_path: Path, fixture_root: Path) -> tuple[Path, Path]:
    """The stand-in official checkout and a copy of the tiny checkpoint whose component folders lack weights."""
    official = tmp_path / "official"
    (official / "models").mkdir(parents=True)
    (official / "pipeline.py").write_text(FAKE_PIPELINE)
    for name in ("tbacuniimage.py", "model.py"):
        (official / "models" / name).write_text("")
    models = tmp_path / "models"
    for folder in ("checkpoint", "tiny-Qwen2.5-VL-Instruct", "tiny-Sana_diffusers"):  # no component weights
        shutil.copytree(fixture_root / folder, models / folder,
                        ignore=None if folder == "checkpoint" else shutil.ignore_patterns("*.safetensors"))
    return official, models


def test_paired_run_with_a_stand_in_official(tmp_path, fixture_root):
    official, models = stand_in_official_and_models(tmp_path, fixture_root)
    out = tmp_path / "results"
    # A relative checkpoint path: the official worker changes its directory, so it must be resolved first.
    relative = os.path.relpath(models / "checkpoint", ROOT)
    done = run("--official", official, "--checkpoint", relative, "--dtype", "fp32", "--repeats", "2",
               "--steps", "3", "--out", out, "--accelerated", "cache_threshold=1,cache_max_skips=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "| phase | ours (median) | official (median) | ours / official |" in done.stdout
    report = json.loads(next(out.glob("side-by-side-checkpoint-fp32-*.json")).read_text())
    assert [run["side"] for run in report["runs"]["ours"]] == ["ours", "ours"]
    table = report["table"]
    for key in ("import_s", "load_s", "load_peak_rss", "generate_s", "regenerate_s", "edit_s"):
        assert table[key]["ours"]["median"] > 0 and table[key]["official"]["median"] > 0, key
        assert len(table[key]["pair_ratios"]) == 2
        assert abs(table[key]["ratio"] - table[key]["ours"]["median"] / table[key]["official"]["median"]) < 1e-9
    assert set(report["image_differences_ours_vs_official"]) == {"generate", "edit"}
    # Ours again with the acceleration: its own processes, ratios to both exact runs, its image cost.
    assert len(report["runs"]["ours-accelerated-0"]) == 2
    (accelerated,) = report["accelerated"]
    assert accelerated["settings"] == {"cache_threshold": 1.0, "cache_max_skips": 2}
    for phase in ("generate", "regenerate", "edit"):
        timing = accelerated["phases"][f"{phase}_s"]
        assert timing["ratio_to_official"] > 0 and timing["ratio_to_ours"] > 0
        assert 0 < accelerated["phases"][f"{phase}_image_vs_ours_exact"]["psnr_db"] < float("inf")  # it skipped work
    assert "| cache_threshold 1 + cache_max_skips 2 | generate |" in done.stdout
    # The component weights the official code loads were written from the checkpoint, embedding cut.
    qwen = models / "tiny-Qwen2.5-VL-Instruct"
    vocab = json.loads((qwen / "config.json").read_text())["vocab_size"]
    with safe_open(str(qwen / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.embed_tokens.weight").get_shape()[0] == vocab
    assert (models / "tiny-Sana_diffusers" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_accuracy_mode_compares_every_image_with_the_official_float32_one(tmp_path, fixture_root):
    official, models = stand_in_official_and_models(tmp_path, fixture_root)
    out = tmp_path / "results"
    done = run("--accuracy", "--official", official, "--checkpoint", models / "checkpoint", "--steps", "2",
               "--out", out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(next(out.glob("accuracy-*.json")).read_text())
    assert set(report["against"]) == {"generate", "edit"}
    for rows in report["against"].values():
        assert set(rows) == {"ours bf16", "ours fp32", "official bf16", "ours bf16 vs official bf16"}
        # The stand-in answers a flat grey image in either dtype: its bf16 equals its float32 exactly.
        assert rows["official bf16"] == {"max_abs_levels": 0.0, "psnr_db": float("inf")}
        assert 0 < rows["ours fp32"]["max_abs_levels"] <= 255 and rows["ours fp32"]["psnr_db"] > 0
    assert "against the official float32 image" in done.stdout
