#!/usr/bin/env python3
"""One DiT call with diffusers' SANA linear self-attention vs ``TokenMajorLinearAttnProcessor``, same weights.

Loads a checkpoint (a bf16 one run in bf16 is mapped lazily), then runs one DiT call on a
text-to-image batch (2 guidance rows, the blocks' cross-attention keys/values precomputed, as the
sampler runs every step) in one process, switching every block's self-attention processor between
diffusers' ``SanaLinearAttnProcessor2_0`` and ours (modeling/linear_attention.py), alternating,
and checks whether both give the same bits. Wall seconds, medians, and the process's CPU seconds
beside them.

Usage: python bench/attention_bench.py [--model medium|real|DIR] [--dtype fp32|bf16] [--threads 1]
       [--size 256] [--repeats 5]
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
    args, parser = bu.one_call_benchmark_arguments(__doc__, argv, size=256, repeats=5)
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from tbac_core.modeling.linear_attention import TokenMajorLinearAttnProcessor

    checkpoint, pipe = bu.cpu_pipeline(args, parser)
    dit, model = pipe.model.dit, pipe.model
    blocks = dit.transformer.transformer_blocks
    with torch.no_grad():
        cond = pipe.encode(PROMPT)
        conditions = [torch.cat(pair) for pair in zip(*(cond.block_conditions(branch, dit.embed_condition)
                                                          for branch in ("negative", "positive")))]
        block_kv = dit.precompute_conditions(conditions)
        batch_rows, side = conditions[0].shape[0], args.size // model.vae_scale_factor
        latents = torch.randn(batch_rows, model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        timestep = torch.full((batch_rows,), 500.0)

        def step_with(processor):
            def call():
                for block in blocks:
                    block.attn1.set_processor(processor())
                return dit(latents, timestep, block_kv)
            return call

        times, outputs = bu.alternating({"diffusers": step_with(SanaLinearAttnProcessor2_0),
                                         "token_major": step_with(TokenMajorLinearAttnProcessor)}, args.repeats)
    difference = (outputs["diffusers"].float() - outputs["token_major"].float()).abs().max().item()
    result = {
        **bu.run_facts("bench/attention_bench.py: wall (and CPU) seconds of one DiT call (2 guidance rows), "
                       "diffusers' SANA linear attention vs TokenMajorLinearAttnProcessor", args, checkpoint),
        "rows": batch_rows, "same_bits": torch.equal(outputs["diffusers"], outputs["token_major"]),
        "max_abs_difference": difference,
    }
    rows = bu.timing_rows(result, times, {"diffusers": "diffusers' processor", "token_major": "token-major"})
    result["token_major_over_diffusers"] = result["token_major_s"] / result["diffusers_s"]
    print(bu.markdown_table([f"one DiT call, {batch_rows} rows, {args.size}x{args.size}", "wall s (median)", "range",
                             "CPU s (median)"], rows))
    print(f"token-major / diffusers: {result['token_major_over_diffusers']:.3f} (wall); same bits: "
          f"{result['same_bits']} (max difference {difference:.2e})")
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
