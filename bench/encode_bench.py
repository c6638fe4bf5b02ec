#!/usr/bin/env python3
"""MLLM conditioning time as an artist iterates: new prompts, new instructions for the same image.

One process, one model. Timed (CPU, no request cache, so every encode runs the MLLM for what it
does not already have): the first text-to-image encode, then ``--repeats`` encodes of new prompts
with the same negative prompt; the first edit encode of one image, then new instructions for the
same image. With the guidance-row cache (``guidance_cache_size``, the default) the later encodes
run only the prompt's own row; ``--guidance-cache-size 0`` runs every row each time.

Usage: python bench/encode_bench.py [--model medium|DIR] [--dtype fp32|bf16] [--threads 1]
       [--repeats 3] [--guidance-cache-size N] [--image-size 512]
Prints the medians; ``--out FILE`` also writes them as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchutil as bu  # noqa: E402
import torch  # noqa: E402
from prompts import EDIT_PROMPT, PROMPT  # noqa: E402

NEW_PROMPTS = ("a yellow dog under a green tree", "a small boat on a calm grey sea at dawn",
               "an old red bicycle leaning on a white wall", "a bowl of oranges on a wooden table")
NEW_INSTRUCTIONS = ("Make the background purple", "Add a yellow star", "Turn the square green",
                    "Remove the red square")


def edit_image(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (230, 230, 230))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(200, 30, 30))
    return image


def cpu_seconds(call) -> float:
    return bu.wall_and_cpu_seconds(call).cpu


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bu.add_model_options(parser)
    parser.add_argument("--repeats", type=int, default=3, help=f"new prompts / instructions (1..{len(NEW_PROMPTS)})")
    parser.add_argument("--guidance-cache-size", type=int, default=None,
                        help="TBACPipeline's guidance_cache_size (default: the library's)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the edited image in pixels")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= len(NEW_PROMPTS):
        parser.error(f"--repeats must be in 1..{len(NEW_PROMPTS)}")
    torch.set_num_threads(args.threads)

    from tbac_core import TBACPipeline

    checkpoint = bu.model_checkpoint(args.model)
    options = {} if args.guidance_cache_size is None else {"guidance_cache_size": args.guidance_cache_size}
    pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype=args.dtype, cache_size=0, **options)
    image = edit_image(args.image_size)
    with torch.no_grad():
        first_prompt = cpu_seconds(lambda: pipe.encode(PROMPT))
        new_prompts = [cpu_seconds(lambda p=p: pipe.encode(p)) for p in NEW_PROMPTS[:args.repeats]]
        first_edit = cpu_seconds(lambda: pipe.encode(EDIT_PROMPT, images=[image]))
        new_instructions = [cpu_seconds(lambda p=p: pipe.encode(p, images=[image]))
                            for p in NEW_INSTRUCTIONS[:args.repeats]]
    result = {
        "what": "bench/encode_bench.py: CPU seconds of MLLM conditioning, no request cache",
        "date": datetime.date.today().isoformat(), "model": str(checkpoint), "dtype": args.dtype,
        "threads": args.threads,
        "guidance_cache_size": "library default" if args.guidance_cache_size is None else args.guidance_cache_size,
        "image_size": args.image_size, "machine": bu.machine_facts(),
        "first_prompt_s": first_prompt, "new_prompt_s": statistics.median(new_prompts),
        "first_edit_s": first_edit, "new_instruction_same_image_s": statistics.median(new_instructions),
    }
    print(bu.markdown_table(["encode", "CPU s"], [
        ["first text-to-image prompt", f"{first_prompt:.3f}"],
        [f"new prompt, same negative (median of {args.repeats})", f"{result['new_prompt_s']:.3f}"],
        ["first edit of the image", f"{first_edit:.3f}"],
        [f"new instruction, same image (median of {args.repeats})", f"{result['new_instruction_same_image_s']:.3f}"],
    ]))
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
