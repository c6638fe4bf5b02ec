"""``quantize``: write an fp8 or GGUF copy of a checkpoint folder that ``--model`` then loads directly."""
from __future__ import annotations

from pathlib import Path

from ...errors import UsageError
from ...params import QUANTIZATION_FORMATS
from ..context import CommandContext, log
from ..options import resolve_model_dir


def add_quantize_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="Write an fp8 or GGUF (Q8_0/Q5_K/Q4_K) copy of a checkpoint.",
        description="Quantise the linear weights of the MLLM's decoder layers and the DiT's blocks; the VAE, "
                    "norms, embeddings and connector stay 16/32-bit. fp8 writes config.json + model.safetensors "
                    "(float8_e4m3fn with per-tensor scales); q8_0/q5_k/q4_k write config.json + model.gguf "
                    "(needs: pip install gguf). The other files of the folder are copied.")
    parser.add_argument("--model", "-m", metavar="DIR", help="The checkpoint folder to quantise (default: "
                        "$TBAC_MODEL, else the built-in demo model).")
    parser.add_argument("--format", "-f", choices=QUANTIZATION_FORMATS, default=QUANTIZATION_FORMATS[0],
                        help="fp8 (default), q8_0 (near lossless), q5_k or q4_k (smallest).")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="New (or empty) output folder.")
    parser.set_defaults(handler=run_quantize)


def run_quantize(ctx: CommandContext) -> int:
    args = ctx.args
    source = resolve_model_dir(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; choose a new one.")
    ctx.info()  # a missing or broken model folder is reported before anything heavy is imported

    # torch & co.: only once the arguments are good
    from ...quantization import quantize_checkpoint

    quantize_checkpoint(source, out, args.format)
    log(f"Wrote {args.format} checkpoint to {out}; load it with --model {out}.")
    return 0
