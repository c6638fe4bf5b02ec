"""Quality cost of fp8 / GGUF weights: PSNR of images and token agreement of answers vs unquantised.

    python bench/quant_quality.py                 # the demo model (tbac_core/demo/checkpoint)
    python bench/quant_quality.py --model DIR     # any checkpoint folder (e.g. bench's medium model)

Each format is written with ``quantize_checkpoint`` into a temporary folder and loaded from there
(the path users take). Images: same prompts, same seeds, same steps; PSNR over 8-bit RGB against
the unquantised model in the same compute dtype. Answers: greedy decoding; agreement = the share of
the reference answer's token positions where the quantised model produced the same token.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu

from tbac_core.loading import load_model
from tbac_core.params import QUANTIZATION_FORMATS, GenerationSettings
from tbac_core.pipeline.tbac_pipeline import TBACPipeline
from tbac_core.pipeline.understanding import generate_answer_ids
from tbac_core.quantization import quantize_checkpoint

PROMPTS = ("a red circle on a blue background", "a lighthouse at dusk, oil painting", "a green cat")
QUESTIONS = ("What is in this picture?", "Describe the colours.")
DEMO = Path(__file__).resolve().parents[1] / "tbac_core" / "demo" / "checkpoint"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(model, size: int, steps: int, tokens: int):
    """Images of ``PROMPTS`` (seed = index) and greedy answers about one fixed picture (the same input
    for every format, so the agreement measures the answering model only)."""
    pipe = TBACPipeline(model, cache_size=0)
    images = [np.asarray(pipe.generate(p, width=size, height=size, steps=steps, seed=i).images[0])
              for i, p in enumerate(PROMPTS)]
    settings = GenerationSettings(max_new_tokens=tokens)
    picture = bu.test_image(size)
    answers = [generate_answer_ids(pipe, q, images=[picture], settings=settings)[1] for q in QUESTIONS]
    return images, answers


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    same = sum(a == b for ref, oth in zip(reference, other) for a, b in zip(ref, oth))
    return same / max(1, sum(len(ref) for ref in reference))


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--models-dir", action="append", default=[])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=["fp8", "q8_0", "q5_k", "q4_k"], choices=QUANTIZATION_FORMATS)
    args = parser.parse_args()
    torch.manual_seed(0)
    load = {"device": "cpu", "dtype": args.dtype, "models_dirs": args.models_dir + [args.model.parent]}
    ref_images, ref_answers = run(load_model(args.model, **load), args.size, args.steps, args.tokens)
    rows = [("unquantised", weight_bytes(args.model), "-", "-", "100%")]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            folder = quantize_checkpoint(args.model, Path(tmp) / fmt, fmt)
            images, answers = run(load_model(folder, **load), args.size, args.steps, args.tokens)
            values = [psnr(a, b) for a, b in zip(ref_images, images)]
            rows.append((fmt, weight_bytes(folder), f"{np.mean(values):.1f}", f"{min(values):.1f}",
                         f"{100 * agreement(ref_answers, answers):.0f}%"))
    print(f"model: {args.model}  compute dtype: {args.dtype}  {args.size}x{args.size}, {args.steps} steps, "
          f"{len(PROMPTS)} prompts; {len(QUESTIONS)} answers x {args.tokens} tokens (greedy)\n")
    print("| weights | file bytes | PSNR mean (dB) | PSNR min (dB) | answer tokens agreeing |")
    print("|---|---|---|---|---|")
    for name, size, mean, low, agree in rows:
        print(f"| {name} | {size / 1e6:.2f} MB | {mean} | {low} | {agree} |")


if __name__ == "__main__":
    main()
