"""The model options every model-loading command shares (also ``train``'s), and where the model is.

Pure argparse + os: importing this module loads no torch, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..demo import DEMO_NAME
from ..errors import UsageError
from ..params import DTYPE_CHOICES, MEMORY_MODES, QUANTIZATION_FORMATS

MODEL_ENV = "TBAC_MODEL"
CONFIG_NAME = "config.json"


def model_options(*, compile_option: bool = True, weights_option: bool = True) -> argparse.ArgumentParser:
    """The model-loading flags, as a parent parser for every command that loads a model.

    ``compile_option``: offer ``--compile`` (only commands that run the DiT use it). ``weights_option``:
    offer ``--weights`` (not ``train``: quantised layers are not trained).
    """
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="DIR",
                       help=f"TBAC-UniImage checkpoint folder (default: ${MODEL_ENV}, else the built-in demo "
                            f"model; '{DEMO_NAME}' picks the demo model explicitly).")
    group.add_argument("--tokenizer", metavar="DIR", help="Folder with the Qwen2.5 tokenizer files, when the "
                       "checkpoint folder has none.")
    group.add_argument("--models-dir", metavar="DIR", action="append",
                       help="Extra folder to look for component folders (Qwen2.5-VL-3B-Instruct, Sana...) in; "
                            "repeatable (also $TBAC_MODELS_DIR).")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="Weight precision; auto = fp32 on the CPU, bf16 on GPUs that support it (else fp16).")
    group.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--memory", choices=MEMORY_MODES, default=MEMORY_MODES[0],
                       help="full: everything stays on the device (fastest); offload-mllm: the MLLM goes back to "
                            "the CPU after encoding; sequential: each part is on the device only while it runs.")
    if weights_option:
        group.add_argument("--weights", choices=QUANTIZATION_FORMATS, default=None,
                           help="Quantise the linear layers of the MLLM and DiT while loading (fp8, q8_0: half the "
                                "bytes of bf16, q8_0 near lossless; q5_k, q4_k: smaller, at a visible cost). "
                                "Default: the weights as stored (an fp8 or GGUF folder loads as it is).")
    if compile_option:
        group.add_argument("--compile", action="store_true",
                           help="Compile the DiT blocks with torch.compile (needs a C++ compiler on the CPU, triton "
                                "on CUDA; without one a warning and the uncompiled DiT). The first image is slow "
                                "(compiling), later ones faster; same images within float rounding.")
    return parser


def model_load_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``load_model`` / ``TBACPipeline.from_pretrained`` the model options give."""
    return {"dtype": args.dtype, "device": args.device, "tokenizer_dir": args.tokenizer,
            "models_dirs": args.models_dir or None, "quantization": getattr(args, "weights", None)}


def resolve_model_dir(model: str | None) -> Path:
    """``--model``, else ``$TBAC_MODEL``, else the built-in demo model (also chosen by 'demo')."""
    value, source = (model, "--model") if model else (os.environ.get(MODEL_ENV) or None, f"${MODEL_ENV}")
    if value is None or (value == DEMO_NAME and not Path(value).is_dir()):
        return demo_checkpoint()
    path = Path(value).expanduser()
    if not (path / CONFIG_NAME).is_file():
        where = "does not exist" if not path.exists() else f"has no {CONFIG_NAME}"
        raise UsageError(
            f"{source} = {value!r}: the folder {where}. Give the TBAC-UniImage checkpoint folder (config.json "
            f"+ model*.safetensors), e.g. --model models/tbac/TBAC-UniImage-3B, or leave --model and "
            f"${MODEL_ENV} unset to use the built-in demo model."
        )
    return path


def demo_settings() -> dict | None:
    """The demo model's stored sampling settings (plain JSON), for help texts; None without a demo."""
    try:
        from ..demo import demo_defaults
    except ModuleNotFoundError:
        return None
    return demo_defaults()


def demo_checkpoint() -> Path:
    """The built-in demo model's folder; a ``UsageError`` when this installation has none."""
    # The demo is an optional part of an installation (a lazy import for that, not for a circle).
    try:
        from ..demo import DEMO_CHECKPOINT
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__.rpartition('.')[0]}.demo":  # tbac_core.demo
            raise
        raise UsageError(
            f"No model given and the built-in demo model is not part of this installation "
            f"(tbac_core/demo is missing). Pass --model <checkpoint folder> or set ${MODEL_ENV}."
        ) from exc
    path = Path(DEMO_CHECKPOINT)
    if not (path / CONFIG_NAME).is_file():
        raise UsageError(f"The built-in demo model is incomplete: no config.json in {path}. Reinstall, or pass "
                         f"--model <checkpoint folder>.")
    return path
