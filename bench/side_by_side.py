#!/usr/bin/env python3
"""Ours against the official implementation, side by side: same model, same machine, same run.

Each measurement is a fresh process per side, the two sides alternating (ours first on even
repeats, the official code first on odd ones), so both see the same machine load; the table shows
medians of the paired runs and the ratio ours / official. Phases, in one process each time:

* ``import``: importing the library (``from pipeline import TBACUniImagePipeline`` for the official
  code, ``from tbac_core import TBACPipeline`` + its loader for ours), torch included;
* ``load``: the checkpoint to a ready pipeline on the CPU, with its peak RSS (``VmHWM``, reset just
  before) — the official code as its ``app.py`` does it (``from_pretrained(..., torch_dtype)`` then
  ``.to(device, dtype)``), ours ``TBACPipeline.from_pretrained``;
* ``generate``: one text-to-image generation (guidance 4.5, seed 0, DPM++, the model's own size);
* ``regenerate``: the same prompt and seed again (ours reuses the cached conditioning);
* ``edit``: one instruction edit of one input image (guidance 4.5, image guidance 1.5), called as the
  official ``app.py`` calls the pipeline (``image=[[img]]``).

With ``--accelerated`` our side also runs, in processes of its own (alternating with the others),
with each given set of the opt-in accelerations: the same phases, their ratio to the official code's
exact run, and the PSNR of each image against our exact image (the acceleration's image cost).

The three generation phases are timed twice: wall time, and the process's CPU time (with one
torch thread, what the phase computed; steadier than wall time when other jobs share the machine).

The official implementation is not part of this project: give the path of an unmodified checkout
(``--official``); it is imported from there, never copied. It needs transformers 4.5x
(``--official-python``, e.g. /work/venv-old/bin/python) and the component models' weights, which
the released checkpoint's ``__init__`` loads before the checkpoint overwrites them: this script
writes them into the component folders from the checkpoint's own tensors (the embedding cut to the
base vocabulary) when they are missing. Our loader never reads them.

Usage:
    python bench/side_by_side.py --official /work/official [--model medium-bf16] [--dtype bf16]
        [--repeats 3] [--steps 20] [--threads 1] [--sides ours,official] [--out bench/results]
        [--accelerated "cache_threshold=0.2;cache_threshold=0.2,guidance_cutoff=0.9"]
Results: a table on stdout and ``results/side-by-side-<model>-<dtype>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:  # prompts, and lazily benchutil / make_random_checkpoint
    sys.path.insert(0, str(BENCH))
from accelerations import ACCELERATION_KEYS, acceleration_label, parse_accelerated  # noqa: E402 - no imports either
from prompts import EDIT_PROMPT, PROMPT  # noqa: E402 - a module without imports (timing starts later)
RESULTS = BENCH / "results"
MODELS = BENCH / "models"
OFFICIAL_FILES = ("pipeline.py", "models/tbacuniimage.py", "models/model.py")
SIDES = ("ours", "official")
PHASES = ("import", "load", "generate", "regenerate", "edit")
RESULT_MARK = "SIDE_BY_SIDE_RESULT "
WORKER_TIMEOUT_S = 900  # one side's process, all phases; a hung run must not hang the benchmark
DTYPES = ("bf16", "fp32")


class SetupError(Exception):
    """The benchmark cannot start: a wrong --official folder, a missing model, a worker that failed."""


# -- setup --------------------------------------------------------------------------------------
def check_official_dir(folder: Path) -> Path:
    """``folder`` must be a checkout of DruryXu/TBAC-UniImage (its pipeline and model files)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SetupError(f"--official {folder}: no such folder. Give the path of a checkout of the official "
                         f"implementation (github.com/DruryXu/TBAC-UniImage), e.g. /work/official.")
    missing = [name for name in OFFICIAL_FILES if not (folder / name).is_file()]
    if missing:
        raise SetupError(f"--official {folder} is not a checkout of the official implementation: it lacks "
                         f"{', '.join(missing)} (a checkout holds {', '.join(OFFICIAL_FILES)}).")
    return folder


def ensure_model(name: str, models_dir: Path, fixtures: Path | None) -> Path:
    """The checkpoint folder of random model ``name`` under ``models_dir``, built when missing."""
    checkpoint = models_dir / name / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        import make_random_checkpoint as mrc

        print(f"building the random {name} model in {models_dir / name} ...", flush=True)
        spec = mrc.make_spec(name, fixtures or mrc.DEFAULT_FIXTURES)
        mrc.write_checkpoint(spec, models_dir, fixtures=fixtures or mrc.DEFAULT_FIXTURES)
    return checkpoint


def write_official_component_weights(checkpoint: Path) -> list[Path]:
    """Give the component folders the weights the official ``__init__`` loads (taken from the checkpoint).

    Qwen2.5-VL: the ``model.mllm_backbone.*`` tensors with the embedding cut to ``vocab_size`` rows
    (the official code adds the metaquery rows itself); SANA: ``model.transformer.*`` and ``vae.*``.
    Written once; files already there are kept. Returns the files written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    root = checkpoint.parent
    qwen_dir, sana_dir = root / config["mllm_id"], root / config["diffusion_model_id"]
    vocab = json.loads((qwen_dir / "config.json").read_text())["vocab_size"]
    targets = {
        "model.mllm_backbone.": qwen_dir / "model.safetensors",
        "model.transformer.": sana_dir / "transformer" / "diffusion_pytorch_model.safetensors",
        "vae.": sana_dir / "vae" / "diffusion_pytorch_model.safetensors",
    }
    written = []
    weight_files = sorted(checkpoint.glob("*.safetensors"))
    for prefix, target in targets.items():
        if target.is_file():
            continue
        tensors = {}
        for path in weight_files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    if key.startswith(prefix):
                        tensor = handle.get_tensor(key)
                        if key.endswith("embed_tokens.weight"):
                            tensor = tensor[:vocab]
                        tensors[key[len(prefix):]] = tensor.contiguous()
        save_file(tensors, str(target), metadata={"format": "pt"})
        written.append(target)
        del tensors
    return written


# -- one side in a fresh process ----------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _edit_image():
    """The fixture's edit input, rebuilt: R = 4x, G = 4y, B = 128 with a red square (64x64 scaled up)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([4 * x, 4 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[20:44, 20:44] = (255, 0, 0)
    return Image.fromarray(pixels).resize((256, 256), Image.NEAREST)


def _stand_in_for_missing_torchvision() -> None:
    """Let the official ``models/model.py`` import where torchvision is not installed.

    It imports ``torchvision.transforms`` at the top but uses it only for LLaVA-OneVision MLLMs, never
    for TBAC-UniImage's Qwen2.5-VL. The stand-in has no package metadata, so transformers still sees
    torchvision as absent (and uses the PIL image processor, as for the fixture's goldens); any use
    of it raises. Nothing of the official code is changed.
    """
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return

    class Unavailable(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):  # module machinery probing (__file__, __path__): absent, as usual
                raise AttributeError(name)
            raise ImportError(f"torchvision is not installed (the side-by-side stand-in has no {name!r})")

    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    package.transforms = Unavailable("torchvision.transforms")
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = package.transforms


def run_worker(side: str, checkpoint: Path, official: Path | None, dtype_name: str, steps: int, threads: int,
               phases: list[str], images_out: Path, acceleration: dict | None = None, label: str | None = None) -> dict:
    """Measure ``phases`` for ``side`` in this process; the images go to ``images_out`` (.npy).

    ``acceleration``: our opt-in acceleration settings (``generate``/``edit`` keywords) for every
    generation phase; ``label`` names the images (default: ``side``).
    """
    acceleration = acceleration or {}
    start = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    result: dict = {"side": side, "python": sys.executable, "torch_threads": threads}
    if side == "official":
        sys.path.insert(0, str(official))
        os.chdir(checkpoint.parent)  # the checkpoint's component ids are relative to its parent
        _stand_in_for_missing_torchvision()
        from pipeline import TBACUniImagePipeline
    else:
        sys.path.insert(0, str(REPO))
        from tbac_core import TBACPipeline
        from tbac_core.loading import load_model  # noqa: F401 - the loader's imports are part of import time
    result["import_s"] = time.perf_counter() - start
    result["rss_after_import"] = _status_kib("VmRSS") * 1024
    if phases == ["import"]:
        return result

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    _reset_peak()
    start = time.perf_counter()
    if side == "official":
        pipe = TBACUniImagePipeline.from_pretrained(str(checkpoint), ignore_mismatched_sizes=True,
                                                    _gradient_checkpointing=False, torch_dtype=dtype)
        pipe = pipe.to(device="cpu", dtype=dtype)
    else:
        pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype=dtype)
    result["load_s"] = time.perf_counter() - start
    result["load_peak_rss"] = _status_kib("VmHWM") * 1024
    result["rss_after_load"] = _status_kib("VmRSS") * 1024

    def official_call(image=None, caption=PROMPT):
        out = pipe(caption=caption, image=image, negative_prompt="", guidance_scale=4.5, image_guidance_scale=1.5,
                   generator=torch.Generator().manual_seed(0), num_inference_steps=steps, num_images_per_prompt=1)
        return np.asarray(out.images[0])

    def ours_call(image=None, caption=PROMPT):
        if image is None:
            out = pipe.generate(caption, "", steps=steps, guidance_scale=4.5, seed=0, **acceleration)
        else:
            out = pipe.edit(caption, image[0], "", steps=steps, guidance_scale=4.5, image_guidance_scale=1.5, seed=0,
                            **acceleration)
        return np.asarray(out.images[0])

    call = official_call if side == "official" else ours_call
    for phase, kwargs in (("generate", {}), ("regenerate", {}),
                          ("edit", {"image": [[_edit_image()]], "caption": EDIT_PROMPT})):
        if phase not in phases:
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            image = call(**kwargs)
        result[f"{phase}_s"] = time.perf_counter() - start
        result[f"{phase}_cpu_s"] = time.process_time() - cpu_start
        np.save(images_out / f"{label or side}-{phase}.npy", image)
        if phase == "generate":
            result["peak_rss_through_generate"] = _status_kib("VmHWM") * 1024
    return result


def spawn_worker(side: str, python: str, args, checkpoint: Path, images_out: Path,
                 acceleration: dict | None = None, label: str | None = None) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", side, "--checkpoint", str(checkpoint),
               "--dtype", args.dtype, "--steps", str(args.steps), "--threads", str(args.threads),
               "--phases", ",".join(args.phases), "--images-out", str(images_out)]
    if acceleration:
        command += ["--worker-acceleration", json.dumps(acceleration), "--worker-label", label]
    if side == "official":
        command += ["--official", str(args.official)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env,
                              cwd=str(REPO))
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"the {side} run did not finish within {WORKER_TIMEOUT_S} s: {' '.join(command)}") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-3000:]
        raise SetupError(f"the {side} run failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


# -- summary ------------------------------------------------------------------------------------
METRICS = (  # key, label, unit
    ("import_s", "import", "s"),
    ("load_s", "load", "s"),
    ("load_peak_rss", "load peak RSS (VmHWM)", "MiB"),
    ("rss_after_load", "RSS after load", "MiB"),
    ("generate_s", "first generation", "s"),
    ("peak_rss_through_generate", "peak RSS through first generation", "MiB"),
    ("regenerate_s", "re-generation, same prompt", "s"),
    ("edit_s", "edit, one image", "s"),
    # CPU time of the process: with one torch thread, what the phase computed, less sensitive than
    # wall time to other jobs on a shared machine (cache sharing still slows both sides).
    ("generate_cpu_s", "first generation, CPU time", "s"),
    ("regenerate_cpu_s", "re-generation, CPU time", "s"),
    ("edit_cpu_s", "edit, CPU time", "s"),
)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per side and metric, and ours / official of the medians and of each pair."""
    table = {}
    for key, label, unit in METRICS:
        values = {side: [run[key] for run in runs.get(side, []) if key in run] for side in SIDES}
        if not any(values.values()):
            continue
        row = {"label": label, "unit": unit}
        for side in SIDES:
            if values[side]:
                row[side] = {"median": statistics.median(values[side]), "values": values[side]}
        if values["ours"] and values["official"]:
            pairs = [a / b for a, b in zip(values["ours"], values["official"]) if b]
            row["ratio"] = row["ours"]["median"] / row["official"]["median"]
            row["pair_ratios"] = pairs
        table[key] = row
    return table


def _cell(value: float, unit: str) -> str:
    return f"{value / 1024**2:.0f} MiB" if unit == "MiB" else f"{value:.3f} s"


def markdown(table: dict) -> str:
    lines = ["| phase | ours (median) | official (median) | ours / official |", "| --- | --- | --- | --- |"]
    for row in table.values():
        ours = _cell(row["ours"]["median"], row["unit"]) if "ours" in row else "-"
        official = _cell(row["official"]["median"], row["unit"]) if "official" in row else "-"
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        lines.append(f"| {row['label']} | {ours} | {official} | {ratio} |")
    return "\n".join(lines)


def image_difference(path: Path, reference: Path) -> dict:
    """Max absolute difference (0..255) and PSNR of the image saved at ``path`` against ``reference``."""
    import numpy as np

    a, b = np.load(path).astype(np.float64), np.load(reference).astype(np.float64)
    if a.shape != b.shape:
        return {"shapes": [list(a.shape), list(b.shape)]}
    mse = float(((a - b) ** 2).mean())
    return {"max_abs_levels": float(np.abs(a - b).max()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)}


def image_differences(images_dir: Path, phases: list[str]) -> dict:
    """Our images against the official ones, per phase."""
    out = {}
    for phase in ("generate", "edit"):
        ours, official = images_dir / f"ours-{phase}.npy", images_dir / f"official-{phase}.npy"
        if phase in phases and ours.is_file() and official.is_file():
            out[phase] = image_difference(ours, official)
    return out


def run_accuracy(args) -> dict:
    """Each side once in bf16 and once in float32; every image against the official float32 one.

    In float32 the two sides agree within a level; in bf16 each side's rounding differs, so their
    bf16 images differ from each other by more than either differs from the float32 result. This
    shows which side's bf16 is closer to it.
    """
    import copy

    official = check_official_dir(args.official)
    checkpoint = ensure_model(args.model, args.models_dir, args.fixtures) if args.checkpoint is None else args.checkpoint
    write_official_component_weights(checkpoint)
    pythons = {"ours": args.python, "official": args.official_python or args.python}
    phases = [p for p in args.phases if p in ("generate", "edit")]
    result: dict = {"what": "bench/side_by_side.py --accuracy: bf16 and float32 images of both sides against the "
                            "official float32 image (PSNR, max difference in 0..255 levels)",
                    "date": datetime.date.today().isoformat(), "model": str(checkpoint), "steps": args.steps,
                    "threads": args.threads, "pythons": pythons, "official": str(official), "against": {}}
    with tempfile.TemporaryDirectory(prefix="side-by-side-accuracy-") as tmp:
        for side in SIDES:
            for dtype in DTYPES:
                folder = Path(tmp) / dtype
                folder.mkdir(exist_ok=True)
                run_args = copy.copy(args)
                run_args.dtype = dtype
                run_args.phases = ["import", "load", *phases]
                spawn_worker(side, pythons[side], run_args, checkpoint, folder)
        for phase in phases:
            reference = Path(tmp) / "fp32" / f"official-{phase}.npy"
            result["against"][phase] = {f"{side} {dtype}": image_difference(Path(tmp) / dtype / f"{side}-{phase}.npy",
                                                                          reference)
                                        for side in SIDES for dtype in DTYPES if (side, dtype) != ("official", "fp32")}
            result["against"][phase]["ours bf16 vs official bf16"] = image_difference(
                Path(tmp) / "bf16" / f"ours-{phase}.npy", Path(tmp) / "bf16" / f"official-{phase}.npy")
    return result


ACCELERATED_PHASES = ("generate", "regenerate", "edit")


def summarize_accelerated(runs: dict[str, list[dict]], configs: list[dict], images_dir: Path) -> list[dict]:
    """Per acceleration set: each phase's median, its ratio to the official exact run and to ours,
    and the PSNR of its images against our exact images."""
    rows = []
    for index, config in enumerate(configs):
        label = f"ours-accelerated-{index}"
        row = {"settings": config, "label": acceleration_label(config), "phases": {}}
        for phase in ACCELERATED_PHASES:
            for key in (f"{phase}_s", f"{phase}_cpu_s"):
                values = [run[key] for run in runs[label] if key in run]
                if not values:
                    continue
                entry = {"median": statistics.median(values), "values": values}
                for side in SIDES:
                    reference = [run[key] for run in runs.get(side, []) if key in run]
                    if reference:
                        entry[f"ratio_to_{side}"] = entry["median"] / statistics.median(reference)
                row["phases"][key] = entry
            ours, accelerated = images_dir / f"ours-{phase}.npy", images_dir / f"{label}-{phase}.npy"
            if ours.is_file() and accelerated.is_file():
                row["phases"][f"{phase}_image_vs_ours_exact"] = image_difference(accelerated, ours)
        rows.append(row)
    return rows


def accelerated_markdown(rows: list[dict]) -> str:
    lines = ["| acceleration | phase | ours accelerated | / official exact | / ours exact | PSNR vs ours exact |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for phase in ACCELERATED_PHASES:
            entry = row["phases"].get(f"{phase}_s")
            if entry is None:
                continue
            image = row["phases"].get(f"{phase}_image_vs_ours_exact", {})
            official = f"{entry['ratio_to_official']:.2f}x" if "ratio_to_official" in entry else "-"
            ours = f"{entry['ratio_to_ours']:.2f}x" if "ratio_to_ours" in entry else "-"
            lines.append(f"| {row['label']} | {phase} | {entry['median']:.3f} s | {official} | {ours} | "
                         f"{image.get('psnr_db', float('nan')):.1f} dB |")
    return "\n".join(lines)


def run_benchmark(args) -> dict:
    sides = args.sides
    official = check_official_dir(args.official) if "official" in sides else None
    checkpoint = ensure_model(args.model, args.models_dir, args.fixtures) if args.checkpoint is None else args.checkpoint
    if official is not None:
        for path in write_official_component_weights(checkpoint):
            print(f"wrote {path} (component weights the official code loads)", flush=True)
    pythons = {"ours": args.python, "official": args.official_python or args.python}
    # (side, acceleration settings, label): the exact sides, then ours with each acceleration set.
    workers = [(side, None, side) for side in sides] + [
        ("ours", config, f"ours-accelerated-{index}") for index, config in enumerate(args.accelerated)]
    runs: dict[str, list[dict]] = {label: [] for _side, _config, label in workers}
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        images = Path(tmp)
        for repeat in range(args.repeats):
            order = workers if repeat % 2 == 0 else list(reversed(workers))
            for side, config, label in order:
                result = spawn_worker(side, pythons[side], args, checkpoint, images, config, label)
                runs[label].append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {label}: " + ", ".join(
                    f"{k}={v:.3f}" if k.endswith("_s") else f"{k}={v / 1024**2:.0f}MiB"
                    for k, v in result.items() if isinstance(v, float | int) and k != "torch_threads"), flush=True)
        differences = image_differences(images, args.phases)
        accelerated = summarize_accelerated(runs, args.accelerated, images)
    import benchutil

    table = summarize(runs)
    return {
        "what": "bench/side_by_side.py: ours vs the official implementation, fresh processes, alternating, medians",
        "date": datetime.date.today().isoformat(),
        "model": args.model if args.checkpoint is None else str(args.checkpoint),
        "checkpoint_bytes": sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")),
        "dtype": args.dtype,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "pythons": pythons,
        "official": str(official) if official else None,
        "machine": benchutil.machine_facts(),
        "table": table,
        "image_differences_ours_vs_official": differences,
        "accelerated": accelerated,
        "runs": runs,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="checkout of the official implementation (not part of this project)")
    parser.add_argument("--model", default="medium-bf16", help="random model of make_random_checkpoint.py (default %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint folder instead of --model")
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--fixtures", type=Path, default=None, help="fixtures folder (the tokenizer of the random models)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default="ours,official", help="ours,official (or one of them)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--python", default=sys.executable, help="python for our side (default: this one)")
    parser.add_argument("--official-python", default=None, help="python for the official side (default: --python)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default %(default)s)")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead of timing: both sides in bf16 and float32 once, images against the official float32")
    parser.add_argument("--accelerated", default="",
                        help="our side again with these opt-in accelerations, sets separated by ';', each "
                             "key=value[,key=value] of " + ", ".join(ACCELERATION_KEYS))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-acceleration", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    args.phases = [p for p in args.phases.split(",") if p]
    bad = [s for s in args.sides if s not in SIDES] + [p for p in args.phases if p not in PHASES]
    if bad or not args.sides or "import" not in args.phases:
        parser.error(f"--sides takes {', '.join(SIDES)}; --phases takes {', '.join(PHASES)} and always includes "
                     f"import (got {', '.join(bad) or 'no import'}).")
    if ("official" in args.sides or args.accuracy) and args.official is None and args.worker is None:
        parser.error("--official PATH is needed to run the official side (or use --sides ours).")
    if args.checkpoint is not None:
        args.checkpoint = args.checkpoint.resolve()  # the official worker changes its directory
    try:
        args.accelerated = parse_accelerated(args.accelerated)
    except ValueError as exc:
        parser.error(f"--accelerated: {exc}")
    if args.accelerated and "ours" not in args.sides:
        parser.error("--accelerated runs our side: keep ours in --sides.")
    if args.repeats < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--repeats, --steps and --threads must be >= 1.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        acceleration = json.loads(args.worker_acceleration) if args.worker_acceleration else None
        result = run_worker(args.worker, args.checkpoint, args.official, args.dtype, args.steps, args.threads,
                            args.phases, args.images_out, acceleration, args.worker_label)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    try:
        report = run_accuracy(args) if args.accuracy else run_benchmark(args)
    except SetupError as exc:
        print(f"side_by_side: {exc}", file=sys.stderr)
        return 2
    if args.accuracy:
        for phase, rows in report["against"].items():
            print(f"{phase}, against the official float32 image:")
            for name, diff in rows.items():
                print(f"  {name:28s} {diff.get('psnr_db', float('nan')):6.1f} dB, max {diff.get('max_abs_levels')} levels")
        name = f"accuracy-{Path(report['model']).parent.name}-{report['date']}.json"
    else:
        print()
        print(f"model {report['model']} ({report['checkpoint_bytes'] / 1024**2:.0f} MiB of safetensors), {args.dtype} "
              f"on the CPU, {args.steps} steps, {args.threads} torch thread(s), medians of {args.repeats} paired runs")
        print(markdown(report["table"]))
        for phase, diff in report["image_differences_ours_vs_official"].items():
            print(f"{phase} image, ours vs official: {diff}")
        if report["accelerated"]:
            print(accelerated_markdown(report["accelerated"]))
        name = f"side-by-side-{Path(report['model']).name}-{args.dtype}-{report['date']}.json"
    import benchutil

    print(f"wrote {benchutil.write_json(args.out / name, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
