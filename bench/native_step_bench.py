#!/usr/bin/env python3
"""One denoising step of the ladder DiT as core samplers drive it: raw conditions vs cached keys/values.

Core samplers on 'TBAC Native Model' hand the DiT its raw conditions at every step. Without the
sampling run's ``ConditionKVCache`` every block projects its condition's cross-attention keys and
values again each step; with it they are projected once per run. This times one DiT call on a
text-to-image batch (negative + positive rows, same latents) three ways, in one process, alternating:
``strided`` (each block's condition a strided view of core's side-by-side context, projected in the
call: the native model before it made them contiguous), ``raw`` (contiguous copies projected in the
call: the first step of a run) and ``cached`` (a ``ConditionKVCache`` hit: every later step). Wall seconds, medians (with more than one thread, the CPU time of OpenMP's waiting
threads would blur the comparison), and the process's CPU seconds beside them.

``--offloadable-layers`` first makes the DiT's layers offloadable (``layer_offload``), the form every
layer has under the pack's ComfyUI nodes (so ComfyUI's memory manager may stream them): the fast
paths must hold there too.

Usage: python bench/native_step_bench.py [--model medium|DIR] [--dtype fp32|bf16] [--threads 1]
       [--size 256] [--repeats 5] [--offloadable-layers]
``--out FILE`` also writes the figures as JSON.
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchutil as bu  # noqa: E402
import torch  # noqa: E402
from prompts import PROMPT  # noqa: E402


def main(argv=None) -> dict:
    args, parser = bu.one_call_benchmark_arguments(
        __doc__, argv, size=256, repeats=5,
        add_arguments=lambda p: p.add_argument(
            "--offloadable-layers", action="store_true",
            help="make the DiT's layers offloadable first, as the pack's ComfyUI nodes have them"))
    from tbac_core.modeling import ConditionKVCache, make_layers_offloadable, mask_to_bias

    checkpoint, pipe = bu.cpu_pipeline(args, parser)
    dit, model = pipe.model.dit, pipe.model
    offloadable = len(make_layers_offloadable(dit)) if args.offloadable_layers else 0
    with torch.no_grad():
        cond = pipe.encode(PROMPT)
        # core's context: each block's condition side by side, [rows, blocks * N, D]; negative then positive.
        context = torch.cat([torch.cat(cond.block_conditions(branch, dit.embed_condition), dim=1)
                             for branch in ("negative", "positive")])
        rows, tokens = context.shape[0], context.shape[1] // dit.num_blocks
        bias = mask_to_bias(torch.ones(rows, tokens), dit.dtype)
        side = args.size // model.vae_scale_factor
        latents = torch.randn(rows, model.latent_channels, side, side, dtype=dit.dtype)
        timestep = torch.full((rows,), 500.0)
        cache = ConditionKVCache()
        groups = [f"row{i}" for i in range(rows)]

        def strided():  # the blocks' conditions as strided views of the context (the native model before)
            dit(latents, timestep, list(context.chunk(dit.num_blocks, dim=1)), bias)

        def raw():  # projected in the call from contiguous copies (without a cache: the first step)
            dit(latents, timestep, [block.contiguous() for block in context.chunk(dit.num_blocks, dim=1)], bias)

        def cached():  # the sampling run's cache, from the second step on
            dit(latents, timestep, cache.block_kv(dit, context.clone(), bias, groups))

        times, _ = bu.alternating({"strided": strided, "raw": raw, "cached": cached}, args.repeats)
    result = bu.run_facts("bench/native_step_bench.py: wall (and CPU) seconds of one DiT call (2 guidance rows): "
                          "conditions as strided views, projected in the call, or the native model's cached "
                          "keys/values", args, checkpoint)
    labels = {"strided": "strided views, projected in the call", "raw": "contiguous, projected in the call",
              "cached": "cached keys/values"}
    result["offloadable_layers"] = offloadable
    rows = bu.timing_rows(result, times, labels)
    result["cached_over_raw"] = result["cached_s"] / result["raw_s"]
    result["cached_over_strided"] = result["cached_s"] / result["strided_s"]
    print(bu.markdown_table(["one DiT call, 2 rows", "wall s (median)", "range", "CPU s (median)"], rows))
    print(f"cached / raw: {result['cached_over_raw']:.3f}; cached / strided: {result['cached_over_strided']:.3f} "
          "(wall)")
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
