#!/usr/bin/env python3
"""Float32 linear layers on the CPU: MKL's sgemm (``F.linear``) against oneDNN's product (``onednn_linear``).

Loads a checkpoint on the CPU, runs one short generation while recording the shape of every product
that ``onednn_linear.linear`` sees (and the path it picks), then times each distinct shape both ways,
the weight laid out as the model stores it (``weight_layout``; ``--products``, most frequent first), and a whole text-to-image generation (a new prompt: the MLLM encode, ``--steps``
denoising steps with guidance, the decode) with every linear of the model on one path or the
other, alternating in one process. Prints GFLOP/s per shape and seconds per generation, and
whether both paths give the same latents.

Usage: python bench/linear_bench.py [--model medium|real|DIR] [--threads 1] [--size 256] [--steps 20]
       [--repeats 4] [--products 8]
``--out FILE`` also writes the figures as JSON.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchutil as bu  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from prompts import PROMPT  # noqa: E402


def _add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--products", type=int, default=8, help="how many distinct product shapes to time")


def product_shapes(pipe, size: int) -> collections.Counter:
    """(rows, in, out, whether the weight is stored input-major, whether oneDNN takes it) of every product
    ``onednn_linear.linear`` sees in a 2-step generation -> counts."""
    from tbac_core.modeling import onednn_linear
    from tbac_core.modeling.weight_layout import is_input_major

    shapes: collections.Counter = collections.Counter()
    real = onednn_linear.takes_onednn

    def recorded(input, weight, bias=None):
        taken = real(input, weight, bias)
        shapes[(input.numel() // input.shape[-1], weight.shape[1], weight.shape[0], is_input_major(weight), taken)] += 1
        return taken

    onednn_linear.takes_onednn = recorded
    try:
        pipe.generate(PROMPT + " (shapes)", "", steps=2, guidance_scale=4.5, seed=0, width=size, height=size)
    finally:
        onednn_linear.takes_onednn = real
    return shapes


def time_products(shapes: collections.Counter, limit: int, repeats: int) -> list[dict]:
    from tbac_core.modeling.onednn_linear import _onednn_linear

    rows = []
    generator = torch.Generator().manual_seed(0)
    for (m, k, n, input_major, taken), count in shapes.most_common(limit):
        x, weight, bias = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator), torch.randn(n)
        if input_major:  # as the model stores it (weight_layout)
            weight = weight.t().contiguous().t()
        inner = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP per timed call: long enough to time

        def repeated(call):
            def run():
                for _ in range(inner):
                    call()
            return run

        times, _ = bu.alternating({"mkl": repeated(lambda: F.linear(x, weight, bias)),
                                   "onednn": repeated(lambda: _onednn_linear(x, weight, bias))}, repeats)
        gflop = 2 * m * k * n * inner / 1e9
        best = {name: min(s.wall for s in values) for name, values in times.items()}
        rows.append({"rows": m, "in": k, "out": n, "input_major_weight": input_major,
                     "calls_per_generation_2_steps": count, "onednn_takes_it": taken,
                     "mkl_gflops": gflop / best["mkl"], "onednn_gflops": gflop / best["onednn"]})
    return rows


def main(argv=None) -> dict:
    args, parser = bu.one_call_benchmark_arguments(__doc__, argv, size=256, repeats=4, add_arguments=_add_arguments)
    if args.dtype != "fp32":
        parser.error("only float32 products change path (bfloat16 runs through oneDNN either way)")
    from tbac_core.modeling import onednn_linear

    if not onednn_linear.onednn_linear_available():
        parser.error("this torch build has no oneDNN linear op")
    checkpoint, pipe = bu.cpu_pipeline(args, parser)
    model = pipe.model
    available = onednn_linear.onednn_linear_available

    def generation(on: bool):
        def call():
            for part in (model.mllm, model.dit, model.vae):
                onednn_linear.use_onednn_linears(part, enabled=on)
            onednn_linear.onednn_linear_available = available if on else (lambda: False)
            try:
                pipe.clear_cache()  # a new prompt each time: the encode is part of what is timed
                return pipe.generate(PROMPT, "", steps=args.steps, guidance_scale=4.5, seed=0,
                                     width=args.size, height=args.size).latents
            finally:
                onednn_linear.onednn_linear_available = available
                for part in (model.mllm, model.dit, model.vae):
                    onednn_linear.use_onednn_linears(part, enabled=True)
        return call

    with torch.no_grad():
        shapes = product_shapes(pipe, args.size)
        products = time_products(shapes, args.products, args.repeats)
        times, latents = bu.alternating({"mkl": generation(False), "onednn": generation(True)}, args.repeats)
    difference = (latents["mkl"] - latents["onednn"]).abs().max().item()
    result = {
        **bu.run_facts("bench/linear_bench.py: float32 CPU products, MKL's sgemm (F.linear) against oneDNN "
                       "(onednn_linear), per product shape and per generation", args, checkpoint),
        "steps": args.steps, "products": products, "latents_max_abs_difference": difference,
    }
    print(bu.markdown_table(["rows x in x out", "weight", "calls (2 steps)", "path taken", "MKL GFLOP/s",
                             "oneDNN GFLOP/s", "oneDNN / MKL"],
                            [[f"{p['rows']} x {p['in']} x {p['out']}",
                              "input-major" if p["input_major_weight"] else "row-major", p["calls_per_generation_2_steps"],
                              "oneDNN" if p["onednn_takes_it"] else "MKL",
                              f"{p['mkl_gflops']:.1f}", f"{p['onednn_gflops']:.1f}",
                              f"{p['onednn_gflops'] / p['mkl_gflops']:.2f}x"] for p in products]))
    rows = bu.timing_rows(result, times, {"mkl": "MKL (F.linear)", "onednn": "oneDNN"})
    result["onednn_over_mkl"] = result["onednn_s"] / result["mkl_s"]
    print(bu.markdown_table([f"generation: encode + {args.steps} steps + decode, {args.size}x{args.size}",
                             "wall s (median)", "range", "CPU s (median)"], rows))
    print(f"oneDNN / MKL: {result['onednn_over_mkl']:.3f} (wall); latents max difference {difference:.2e}")
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
