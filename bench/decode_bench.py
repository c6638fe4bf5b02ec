#!/usr/bin/env python3
"""One DC-AE decode with diffusers' modules vs our drop-in equivalents, same weights.

``--compare norms`` (default): diffusers' RMSNorm vs ``LeanRMSNorm`` (modeling/rms_norm.py);
``--compare up-blocks``: diffusers' ``DCUpBlock2d`` vs ``ViewShortcutDCUpBlock`` (modeling/dc_up_block.py)
with its shortcut a view and its upsampling not folded; ``--compare upsampling``: that block with the
nearest x2 upsampling and its convolution as they are vs folded into one transposed convolution.
The rest of the VAE runs as the library runs it. Loads a checkpoint (its tensors are mapped lazily:
only the DC-AE is read), then decodes the same random latents in one process, alternating the two
variants on the same VAE, and reports whether both give the same bits and their largest difference.
Wall seconds, medians (with more than one thread, OpenMP's waiting threads blur CPU time), and the
process's CPU seconds beside them.

Usage: python bench/decode_bench.py [--model medium|real|DIR] [--dtype fp32|bf16] [--threads 1]
       [--size 512] [--repeats 3] [--compare norms|up-blocks|upsampling]
``--out FILE`` also writes the figures as JSON.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchutil as bu  # noqa: E402
import torch  # noqa: E402


def comparisons() -> dict:
    """``--compare`` choice -> (label, (name, swap) of the baseline, (name, swap) of ours)."""
    from tbac_core.modeling.dc_up_block import use_diffusers_up_blocks
    from tbac_core.modeling.rms_norm import use_diffusers_rms_norms, use_lean_rms_norms

    unfolded, folded = (functools.partial(view_shortcut_blocks, folded=f) for f in (False, True))
    return {
        "norms": ("diffusers' RMSNorm vs LeanRMSNorm", ("diffusers", use_diffusers_rms_norms),
                  ("lean", use_lean_rms_norms)),
        "up-blocks": ("diffusers' DCUpBlock2d vs ViewShortcutDCUpBlock (its shortcut a view, upsampling not folded)",
                      ("diffusers", use_diffusers_up_blocks), ("view", unfolded)),
        "upsampling": ("interpolate-then-convolve vs the folded transposed convolution (ViewShortcutDCUpBlock)",
                       ("interpolate", unfolded), ("folded", folded)),
    }


def view_shortcut_blocks(vae, *, folded: bool) -> None:
    """The up-blocks as ``ViewShortcutDCUpBlock`` (the shortcut a view), their upsampling folded or not."""
    from tbac_core.modeling.dc_up_block import use_folded_upsampling, use_view_shortcut_up_blocks

    use_view_shortcut_up_blocks(vae)
    use_folded_upsampling(vae, enabled=folded)


def library_state(vae) -> None:
    """The library's own decoder: lean norms, view-shortcut up-blocks with folded upsampling."""
    from tbac_core.modeling.rms_norm import use_lean_rms_norms

    use_lean_rms_norms(vae)
    view_shortcut_blocks(vae, folded=True)


def main(argv=None) -> dict:
    choices = comparisons()
    args, parser = bu.one_call_benchmark_arguments(
        __doc__, argv, size=512, repeats=3,
        add_arguments=lambda p: p.add_argument("--compare", choices=sorted(choices), default="norms"))
    label, (base, use_base), (ours, use_ours) = choices[args.compare]

    checkpoint, pipe = bu.cpu_pipeline(args, parser)
    side = args.size // pipe.model.vae_scale_factor
    latents = torch.randn(1, pipe.model.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    vae = pipe.model.vae

    def decode_with(swap):
        def call():
            swap(vae)
            return pipe.decode(latents, tiled=False)
        return call

    times, images = bu.alternating({base: decode_with(use_base), ours: decode_with(use_ours)}, args.repeats)
    library_state(vae)
    result = {
        **bu.run_facts(f"bench/decode_bench.py: wall (and CPU) seconds of one DC-AE decode, {label}", args,
                       checkpoint),
        "compare": args.compare,
        "same_bits": torch.equal(images[base], images[ours]),
        "max_abs_difference": float((images[base].float() - images[ours].float()).abs().max()),
    }
    rows = bu.timing_rows(result, times, {})
    result[f"{ours}_over_{base}"] = result[f"{ours}_s"] / result[f"{base}_s"]
    print(bu.markdown_table([f"decode {args.size}x{args.size}, {args.compare}", "wall s (median)", "range",
                             "CPU s (median)"], rows))
    print(f"{ours} / {base}: {result[f'{ours}_over_{base}']:.3f} (wall); same bits: {result['same_bits']} "
          f"(largest difference {result['max_abs_difference']:.2g} of 0..1 pixels)")
    if args.out:
        print(f"wrote {bu.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
