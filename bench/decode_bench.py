#!/usr/bin/env python3
"""The DC-AE decode with diffusers' RMSNorm vs ``LeanRMSNorm`` (modeling/rms_norm.py), same weights.

Loads a checkpoint (its tensors are mapped lazily: only the DC-AE is read), then decodes the same
random latents in one process, alternating the two norms on the same VAE, and checks that both give
the same bits. Wall seconds, medians (with more than one thread, OpenMP's waiting threads blur CPU
time), and the process's CPU seconds beside them.

Usage: python bench/decode_bench.py [--model medium|real|DIR] [--dtype fp32|bf16] [--threads 1]
       [--size 512] [--repeats 3]
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


def main(argv=None) -> dict:
    args, parser = bu.one_call_benchmark_arguments(__doc__, argv, size=512, repeats=3)
    from tbac_core.modeling.rms_norm import use_diffusers_rms_norms, use_lean_rms_norms

    checkpoint, pipe = bu.cpu_pipeline(args, parser)
    side = args.size // pipe.model.vae_scale_factor
    latents = torch.randn(1, pipe.model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    vae = pipe.model.vae

    def decode_with(swap):
        def call():
            swap(vae)
            return pipe.decode(latents, tiled=False)
        return call

    times, images = bu.alternating({"diffusers": decode_with(use_diffusers_rms_norms),
                                    "lean": decode_with(use_lean_rms_norms)}, args.repeats)
    result = {
        **bu.run_facts("bench/decode_bench.py: wall (and CPU) seconds of one DC-AE decode, diffusers' RMSNorm vs "
                       "LeanRMSNorm", args, checkpoint),
        "same_bits": torch.equal(images["diffusers"], images["lean"]),
    }
    rows = bu.timing_rows(result, times, {})
    result["lean_over_diffusers"] = result["lean_s"] / result["diffusers_s"]
    print(bu.markdown_table([f"decode {args.size}x{args.size}, RMSNorm", "wall s (median)", "range",
                             "CPU s (median)"], rows))
    print(f"lean / diffusers: {result['lean_over_diffusers']:.3f} (wall); same bits: {result['same_bits']}")
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
