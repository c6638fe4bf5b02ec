"""The command line: ``python -m tbac_core <command>``, for scripts and batch rendering without ComfyUI.

Commands::

    python -m tbac_core generate --prompt "a red circle on a blue background" --out outputs
    python -m tbac_core generate --prompt "a red circle" --init-image photo.png --denoise 0.6
    python -m tbac_core edit --image photo.png --prompt "make the sky purple" --out outputs
    python -m tbac_core understand --image photo.png --question "What is in this picture?"
    python -m tbac_core batch prompts.jsonl --out renders        # or a .csv file
    python -m tbac_core generate --from-png outputs/tbac_0_0.png  # render an output again

The model folder comes from ``--model``, else ``$TBAC_MODEL``, else the built-in demo model.
Every PNG carries its parameters (see ``tbac_core.io.pngmeta``). Exit status: 0 success, 1 a
generation (or a batch row) failed, 2 unusable arguments or files, 130 interrupted.

Adding a sub-command: write ``add_parser(subparsers)``, which creates the parser with
``subparsers.add_parser(name, parents=[model_options()], help=...)`` (the parent only if it
loads a model) and sets ``parser.set_defaults(handler=run)``, where ``run(ctx: CommandContext)
-> int``; ``ctx.args`` holds the parsed arguments and ``ctx.pipeline()`` loads the model once.
Then append ``add_parser`` to ``COMMANDS``. Keep imports of torch & co. inside ``run`` so that
``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from .. import __version__
from ..errors import InvalidParameterError, TBACError, UsageError
from ..io.pngmeta import encode_png, read_parameters
from ..ladder.layer_spec import LAYER_SPEC_SYNTAX, LayerSpecError, parse_layer_spec

MODEL_ENV = "TBAC_MODEL"
DEMO_NAME = "demo"
DEFAULT_OUT = "outputs"
MANIFEST_NAME = "batch_manifest.jsonl"
# The library's memory modes a script may choose (``external`` is ComfyUI's own manager).
MEMORY_CHOICES = ("full", "offload-mllm", "sequential")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
DEFAULT_IMG2IMG_DENOISE = 0.6  # with an init image, denoise 1.0 would ignore it entirely
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---------------------------------------------------------------------------------------------
# Job parameters: one table shared by the flags of generate/edit/batch and the batch row keys.


@dataclass(frozen=True)
class Field:
    kind: type  # str, int, float or list (of paths)
    flags: tuple[str, ...]
    help: str
    aliases: tuple[str, ...] = ()  # other accepted batch row keys


FIELDS: dict[str, Field] = {
    "prompt": Field(str, ("--prompt", "-p"), "What to draw; for edit, the instruction ('make the sky purple')."),
    "negative_prompt": Field(str, ("--negative-prompt", "-n"), "What to steer away from (default: empty, "
                             "as the official pipeline).", ("negative",)),
    "seed": Field(int, ("--seed",), "Noise seed (default 0); the same seed gives the same image on every device."),
    "steps": Field(int, ("--steps",), "Denoising steps (default 30, the official setting)."),
    "guidance": Field(float, ("--guidance", "--cfg"), "Text guidance scale (default 4.5; 1 disables guidance).",
                      ("guidance_scale", "cfg")),
    "image_guidance": Field(float, ("--image-guidance",), "Edits: how strongly to stay with the input images "
                            "(default 1.5; above 1 = 3-way guidance).", ("image_guidance_scale",)),
    "width": Field(int, ("--width", "-W"), "Width in pixels, a multiple of the model's latent factor (32 for "
                   "TBAC-UniImage-3B; default: the model's trained size, 512)."),
    "height": Field(int, ("--height", "-H"), "Height in pixels (same rules as --width)."),
    "sampler": Field(str, ("--sampler",), "dpm++ (default, the official flow DPM-Solver++) or euler."),
    "layers": Field(str, ("--layers",), "Which MLLM layers feed the DiT blocks (default 'default'): "
                    + LAYER_SPEC_SYNTAX + ".", ("layer_spec",)),
    "num_images": Field(int, ("--num-images", "--images-per-prompt"), "Images per prompt, each with its own "
                        "noise from one seed (default 1).", ("images_per_prompt", "num_images_per_prompt", "batch_size")),
    "images": Field(list, ("--image", "-i"), "Input image to edit; repeat for several images.",
                    ("image", "input_images")),
    "init_image": Field(str, ("--init-image",), "Image-to-image: start from this image instead of pure noise."),
    "denoise": Field(float, ("--denoise",), f"Image-to-image: share of the steps to run, in (0, 1] (default "
                     f"{DEFAULT_IMG2IMG_DENOISE} with --init-image); lower keeps more of the image."),
}
GENERATE_FIELDS = tuple(k for k in FIELDS if k not in ("images", "image_guidance"))
EDIT_FIELDS = tuple(k for k in FIELDS if k not in ("init_image", "denoise"))
ROW_NAME_KEYS = ("id", "name")  # batch row naming; ``id`` wins over ``name``
_ALIASES = {alias: name for name, spec in FIELDS.items() for alias in (name, *spec.aliases)}


@dataclass(frozen=True)
class Job:
    """One render: a prompt (plus input images for an edit, or an init image) and its settings.

    ``width``/``height`` None mean the model's trained size (or, image-to-image, the init image's).
    ``denoise`` None means 1.0, or ``DEFAULT_IMG2IMG_DENOISE`` with an init image.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance: float = 4.5
    image_guidance: float = 1.5
    width: int | None = None
    height: int | None = None
    sampler: str = "dpm++"
    layers: str = "default"
    num_images: int = 1
    images: tuple[str, ...] = ()
    init_image: str | None = None
    denoise: float | None = None
    id: str = "job"
    where: str = "command line"

    @property
    def mode(self) -> str:
        return "edit" if self.images else "img2img" if self.init_image else "generate"

    @property
    def strength(self) -> float:
        if self.denoise is not None:
            return self.denoise
        return DEFAULT_IMG2IMG_DENOISE if self.init_image else 1.0


class JobError(UsageError):
    """A job's parameters are wrong; ``problems`` lists ``(field, message)`` pairs."""

    def __init__(self, where: str, problems: list[tuple[str, str]]):
        self.where = where
        self.problems = problems
        super().__init__("\n".join(f"{where}: {name}: {message}" for name, message in problems))


def coerce(name: str, value: Any, text: bool = False, base_dir: Path | None = None) -> Any:
    """Convert one row/flag value to the field's type; ``None`` means 'not given'.

    ``text``: the value comes from a CSV cell (always a string; empty = not given). Paths are
    taken relative to ``base_dir`` (the rows file's folder) unless absolute.
    """
    kind = FIELDS[name].kind
    if value is None or (text and isinstance(value, str) and not value.strip()):
        return None
    if kind is list:
        items = value.split(";") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
            raise ValueError(f"expected image paths (a list, or one string with paths separated by ';'), "
                             f"got {value!r}")
        paths = tuple(_path(p.strip(), base_dir) for p in items if p.strip())
        return paths or None
    if name == "init_image":
        if not isinstance(value, str):
            raise ValueError(f"expected an image path, got {value!r}")
        return _path(value.strip(), base_dir)
    if kind is str:
        if name == "layers" and isinstance(value, (list, tuple)) and value:
            value = ",".join(map(str, value))  # a JSON list of rungs is the same as '2,3,4,5'
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _path(text: str, base_dir: Path | None) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() or base_dir is None else base_dir / path)


def make_job(values: dict[str, Any], *, job_id: str = "job", where: str = "command line") -> Job:
    """A ``Job`` from already converted values (unknown keys are a programming error)."""
    given = {k: v for k, v in values.items() if v is not None}
    if "prompt" not in given:
        raise JobError(where, [("prompt", "missing; every job needs a prompt (it may be empty: \"\")")])
    if "images" in given:
        given["images"] = tuple(given["images"])
    return Job(**given, id=job_id, where=where)


def check_job(job: Job, model) -> list[tuple[str, str]]:
    """Every problem of ``job`` for ``model`` as ``(field, message with what is allowed)``.

    Checked before anything runs, so a batch reports all bad rows at once, up front.
    """
    from ..params import MAX_BATCH, MAX_SEED, MAX_SIDE, MAX_STEPS, SAMPLERS

    problems = []
    factor = model.vae_scale_factor
    if not 0 <= job.seed <= MAX_SEED:
        problems.append(("seed", f"{job.seed} is out of range; use 0..{MAX_SEED}"))
    if not 1 <= job.steps <= MAX_STEPS:
        problems.append(("steps", f"{job.steps} is out of range; use 1..{MAX_STEPS}"))
    for name in ("guidance", "image_guidance"):
        if not math.isfinite(getattr(job, name)):
            problems.append((name, f"{getattr(job, name)} is not a finite number"))
    if not 0.0 < job.strength <= 1.0:
        problems.append(("denoise", f"{job.strength} is out of range; use a number in (0, 1]"))
    if job.sampler not in SAMPLERS:
        problems.append(("sampler", f"unknown sampler {job.sampler!r}; allowed: {', '.join(SAMPLERS)}"))
    for name in ("width", "height"):
        value = getattr(job, name)
        if value is not None and (not factor <= value <= MAX_SIDE or value % factor):
            problems.append((name, f"{value} is not allowed; use a multiple of {factor} (the model's latent "
                                   f"factor) between {factor} and {MAX_SIDE}"))
    if not 1 <= job.num_images <= MAX_BATCH:
        problems.append(("num_images", f"{job.num_images} is out of range; use 1..{MAX_BATCH}"))
    try:
        parse_layer_spec(job.layers, model.identity.num_rungs, model.identity.num_dit_blocks)
    except LayerSpecError as exc:
        problems.append(("layers", str(exc)))
    if job.images and job.init_image:
        problems.append(("init_image", "an edit (input images) cannot also start from an init image; "
                                       "use images for an edit or init_image for image-to-image"))
    for name, paths in (("images", job.images), ("init_image", (job.init_image,) if job.init_image else ())):
        for path in paths:
            if not os.path.isfile(path):
                problems.append((name, f"no such image file: {path}"))
    return problems


# ---------------------------------------------------------------------------------------------
# Rendering a job and recording its parameters


@dataclass
class InputImage:
    image: Image.Image  # RGB
    record: dict  # {"name": file name, "sha256": of the file bytes}


def load_input_image(path: str) -> InputImage:
    from ..processing.images import to_pil_rgb

    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = to_pil_rgb(opened.copy())
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's ways of saying "not an image"
        raise UsageError(f"Cannot read {path} as an image: {exc}") from exc
    return InputImage(image, {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()})


def fit_init_image(image: Image.Image, width: int | None, height: int | None, factor: int) -> Image.Image:
    """The init image at the requested size (if any), centre-cropped to multiples of ``factor``."""
    size = (width or image.width, height or image.height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    new_w, new_h = image.width - image.width % factor, image.height - image.height % factor
    if (new_w, new_h) != image.size and new_w and new_h:
        left, top = (image.width - new_w) // 2, (image.height - new_h) // 2
        image = image.crop((left, top, left + new_w, top + new_h))
    return image


def model_record(model) -> dict:
    identity = model.identity
    return {"name": identity.name, "fingerprint": identity.fingerprint,
            "dtype": str(model.dit.dtype).replace("torch.", "")}


def job_parameters(job: Job, model, width: int, height: int, inputs: list[InputImage],
                   init: InputImage | None, index: int) -> dict:
    """The record stored in output ``index`` of ``job``: everything needed to render it again."""
    identity = model.identity
    return {
        "tbac_core_version": __version__,
        "mode": job.mode,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "image_guidance": job.image_guidance if job.mode == "edit" else None,
        "width": width,
        "height": height,
        "sampler": job.sampler,
        "layers": job.layers,
        "block_rungs": parse_layer_spec(job.layers, identity.num_rungs, identity.num_dit_blocks),
        "num_images": job.num_images,
        "image_index": index,
        "denoise": job.strength if job.mode == "img2img" else None,
        "init_image": init.record if init is not None else None,
        "input_images": [item.record for item in inputs],
        "model": model_record(model),
    }


def render(pipe, job: Job, *, load_image: Callable[[str], InputImage] = load_input_image,
           callback=None) -> list[tuple[Image.Image, dict]]:
    """Run ``job`` with the library's one-call methods; returns ``(image, parameters)`` per output.

    The pipeline keeps recent conditionings, so a job with the same prompt, negative prompt, input
    images and layers as a recent one does not run the MLLM again.
    """
    model = pipe.model
    common = dict(negative_prompt=job.negative_prompt, steps=job.steps, guidance_scale=job.guidance,
                  sampler=job.sampler, seed=job.seed, num_images_per_prompt=job.num_images, layers=job.layers,
                  callback=callback)
    inputs = [load_image(path) for path in job.images]
    init = load_image(job.init_image) if job.init_image else None
    if inputs:
        width, height = pipe.resolve_size(job.width, job.height)
        output = pipe.edit(job.prompt, images=[item.image for item in inputs], width=width, height=height,
                           image_guidance_scale=job.image_guidance, **common)
    elif init is not None:
        start = fit_init_image(init.image, job.width, job.height, model.vae_scale_factor)
        width, height = start.size
        output = pipe.generate(job.prompt, init_image=start, denoise=job.strength, **common)
    else:
        width, height = pipe.resolve_size(job.width, job.height)
        output = pipe.generate(job.prompt, width=width, height=height, **common)
    return [(image, job_parameters(job, model, width, height, inputs, init, k))
            for k, image in enumerate(output.images)]


def write_new_png(folder: Path, stem: str, data: bytes) -> Path:
    """Write ``<stem>.png`` in ``folder``, or ``<stem>-1.png``, ``-2``... if taken: never overwrite.

    The name is reserved with an exclusive create, then the complete file replaces it, so two
    processes writing to one folder cannot take the same name and no half file stays behind.
    """
    from ..io.files import atomic_write

    for counter in range(100000):
        path = folder / (f"{stem}.png" if counter == 0 else f"{stem}-{counter}.png")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        atomic_write(str(path), data)
        return path
    raise UsageError(f"Too many files named {stem}-N.png in {folder}; use another --prefix or --out.")


def safe_name(value: Any) -> str:
    """``value`` usable as a file name on every OS (row ids and prefixes end up in file names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")


# ---------------------------------------------------------------------------------------------
# Command context: parsed arguments and the model, loaded once


class CommandContext:
    """What a command handler gets: ``args`` and a lazily loaded ``TBACPipeline``.

    ``pipeline`` given: use that already loaded pipeline instead of the model options (for
    embedding the CLI in another program, and for tests).
    """

    def __init__(self, args: argparse.Namespace, pipeline=None):
        self.args = args
        self._pipeline = pipeline

    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.args)
        return self._pipeline

    @staticmethod
    def log(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)  # does not tear an active progress bar


def resolve_model_dir(model: str | None) -> Path:
    """``--model``, else ``$TBAC_MODEL``, else the built-in demo model (also chosen by 'demo')."""
    value, source = (model, "--model") if model else (os.environ.get(MODEL_ENV) or None, f"${MODEL_ENV}")
    if value is None or (value == DEMO_NAME and not Path(value).is_dir()):
        return demo_checkpoint()
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        where = "does not exist" if not path.exists() else "has no config.json"
        raise UsageError(
            f"{source} = {value!r}: the folder {where}. Give the TBAC-UniImage checkpoint folder (config.json "
            f"+ model*.safetensors), e.g. --model models/tbac/TBAC-UniImage-3B, or leave --model and "
            f"${MODEL_ENV} unset to use the built-in demo model."
        )
    return path


def demo_checkpoint() -> Path:
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
    if not (path / "config.json").is_file():
        raise UsageError(f"The built-in demo model is incomplete: no config.json in {path}. Reinstall, or pass "
                         f"--model <checkpoint folder>.")
    return path


def load_pipeline(args: argparse.Namespace):
    from ..pipeline.tbac_pipeline import TBACPipeline

    folder = resolve_model_dir(args.model)
    CommandContext.log(f"Loading {folder} (dtype {args.dtype}, device {args.device}, memory {args.memory}) ...")
    started = time.perf_counter()
    pipe = TBACPipeline.from_pretrained(
        folder, memory=args.memory, device=args.device, dtype=args.dtype,
        tokenizer_dir=args.tokenizer, models_dirs=args.models_dir or None,
        compile_dit=getattr(args, "compile", False),
    )
    CommandContext.log(f"Loaded {pipe.model.identity.name!r} in {time.perf_counter() - started:.1f}s.")
    return pipe


def model_options() -> argparse.ArgumentParser:
    """The model-loading flags, as a parent parser for every command that loads a model."""
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
    group.add_argument("--memory", choices=MEMORY_CHOICES, default="full",
                       help="full: everything stays on the device (fastest); offload-mllm: the MLLM goes back to "
                            "the CPU after encoding; sequential: each part is on the device only while it runs.")
    group.add_argument("--compile", action="store_true",
                       help="Compile the DiT blocks with torch.compile (slow first image, faster after; GPU).")
    return parser


def add_job_options(parser: argparse.ArgumentParser, names: Sequence[str], defaults_note: str = "") -> None:
    group = parser.add_argument_group("generation" + defaults_note)
    for name in names:
        spec = FIELDS[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": spec.help}
        if spec.kind is list:
            kwargs.update(action="append", metavar="PATH")
        elif spec.kind in (int, float):
            kwargs["type"] = spec.kind
        group.add_argument(*spec.flags, **kwargs)


# The checkpoint key of sampling settings a model was tuned with (the demo model stores its own).
CHECKPOINT_DEFAULTS_KEY = "demo_defaults"
# Sizes are left out: the model's trained size is already the default, and image-to-image keeps the
# start image's size.
_DEFAULTS_TO_FIELDS = {"steps": "steps", "guidance_scale": "guidance", "sampler": "sampler", "layers": "layers"}


def checkpoint_job_defaults(pipe) -> dict[str, Any]:
    """Job defaults stored in the loaded checkpoint's config.json, if any (flags and rows override them)."""
    try:
        config = json.loads((Path(pipe.model.checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError):
        return {}
    stored = config.get(CHECKPOINT_DEFAULTS_KEY) or {}
    return {field: stored[key] for key, field in _DEFAULTS_TO_FIELDS.items() if key in stored}


def job_values_from_args(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# ---------------------------------------------------------------------------------------------
# generate / edit


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", parents=[model_options()], help="Text to image (or image to image with --init-image).",
        description="Render images from a prompt; each PNG carries its parameters.")
    add_job_options(parser, GENERATE_FIELDS)
    _add_output_options(parser)
    parser.set_defaults(handler=run_generate, job_fields=GENERATE_FIELDS)


def add_edit_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit", parents=[model_options()], help="Edit images following an instruction.",
        description="Edit input images (--image, repeatable) following the prompt; each PNG carries its "
                    "parameters.")
    add_job_options(parser, EDIT_FIELDS)
    _add_output_options(parser)
    parser.set_defaults(handler=run_generate, job_fields=EDIT_FIELDS)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR", help=f"Output folder (default {DEFAULT_OUT}).")
    group.add_argument("--prefix", default="tbac", help="File names are <prefix>_<seed>_<index>.png; an existing "
                       "file is never overwritten (a -1, -2 ... suffix is added). Default: tbac.")
    group.add_argument("--from-png", metavar="PNG", help="Start from the parameters stored in a PNG written by "
                       "tbac_core (other flags override them; input images must be given again).")


def values_from_png(path: str, names: Sequence[str]) -> dict[str, Any]:
    """The job values recorded in a tbac_core PNG (input images are recorded by hash only)."""
    record = read_parameters(path)
    return {name: record[name] for name in names
            if name not in ("images", "init_image") and record.get(name) is not None}


def run_generate(ctx: CommandContext) -> int:
    args = ctx.args
    editing = "images" in args.job_fields
    values = values_from_png(args.from_png, args.job_fields) if args.from_png else {}
    given = job_values_from_args(args, args.job_fields)
    values.update(given)
    if args.from_png:
        mode = read_parameters(args.from_png).get("mode")
        if mode == "edit" and not editing:
            raise UsageError(f"{args.from_png} is an edit; reproduce it with: edit --from-png {args.from_png} "
                             f"--image <the input image(s)>.")
        if mode == "img2img" and not values.get("init_image"):
            raise UsageError(f"{args.from_png} was made by image-to-image; give its start image again: "
                             f"--init-image PATH.")
    if editing and not values.get("images"):
        raise UsageError("edit needs at least one input image: --image PATH (repeatable).")
    if "denoise" in given and not values.get("init_image"):
        raise UsageError("--denoise only applies to image-to-image; give --init-image PATH as well.")
    job = make_job({**checkpoint_job_defaults(ctx.pipeline()), **values})
    pipe = ctx.pipeline()
    problems = check_job(job, pipe.model)
    if problems:
        raise JobError("command line", problems)
    if args.from_png:
        _compare_with_png(ctx, args.from_png, job, pipe.model)

    from tqdm import tqdm

    bar = tqdm(total=job.steps, unit="step", disable=None, file=sys.stderr, leave=False)

    def progress(info) -> None:
        bar.total = info.total
        bar.update(1)

    try:
        results = render(pipe, job, callback=progress)
    finally:
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_name(args.prefix) or 'tbac'}_{job.seed}"
    for index, (image, parameters) in enumerate(results):
        print(write_new_png(out, f"{stem}_{index}", encode_png(image, parameters)))
    return EXIT_OK


def _compare_with_png(ctx: CommandContext, path: str, job: Job, model) -> None:
    """Warn when the model or input images differ from those the PNG was made with."""
    record = read_parameters(path)
    fingerprint = (record.get("model") or {}).get("fingerprint")
    if fingerprint and fingerprint != model.identity.fingerprint:
        ctx.log(f"warning: {path} was made with model {record['model'].get('name')!r} (fingerprint "
                f"{fingerprint[:12]}), not with the loaded {model.identity.name!r}; the result will differ.")
    recorded = [item.get("sha256") for item in record.get("input_images") or []]
    if record.get("init_image"):
        recorded = [record["init_image"].get("sha256")]
    given = [hashlib.sha256(Path(p).read_bytes()).hexdigest()
             for p in (job.images or ((job.init_image,) if job.init_image else ()))]
    if recorded != given:
        names = [item.get("name") for item in record.get("input_images") or []] + (
            [record["init_image"].get("name")] if record.get("init_image") else [])
        ctx.log(f"warning: {path} was made from input image(s) {names or 'none'}; the images given now differ, "
                f"so the result will differ.")


# ---------------------------------------------------------------------------------------------
# understand


def add_understand_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "understand", parents=[model_options()], help="Ask the model's Qwen2.5-VL about images; prints the answer.",
        description="Ask a question about images (or a text-only question) and print the answer. Decoding "
                    "defaults are those of tbac_core.pipeline.understanding.GenerationSettings (greedy).")
    parser.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                        help="Image to show the model; repeatable. None: a text-only question.")
    parser.add_argument("--question", "-q", default="", help="The question; with --preset, extra instructions.")
    parser.add_argument("--preset", help="A built-in question ('describe in detail', 'short caption', 'write a "
                        "generation prompt for this image', ...); default: 'custom' (the question alone) when "
                        "--question is given, else the first preset.")
    parser.add_argument("--system-prompt", default=None, help="Optional system prompt (default: Qwen2.5-VL's own).")
    settings = parser.add_argument_group("decoding (default: the library's GenerationSettings)")
    settings.add_argument("--max-new-tokens", type=int, help="Longest answer in tokens.")
    settings.add_argument("--do-sample", action="store_true", default=None,
                          help="Sample with the settings below instead of greedy decoding.")
    settings.add_argument("--temperature", type=float, help="Sampling only: higher is more varied.")
    settings.add_argument("--top-p", type=float, help="Sampling only: nucleus probability.")
    settings.add_argument("--top-k", type=int, help="Sampling only; 0 = no limit.")
    settings.add_argument("--repetition-penalty", type=float, help="Above 1 discourages repeats; 1 = off.")
    settings.add_argument("--seed", type=int, help="Sampling only: the same seed repeats the answer.")
    parser.set_defaults(handler=run_understand)


UNDERSTAND_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def run_understand(ctx: CommandContext) -> int:
    from ..params import GenerationSettings
    from ..pipeline.understanding import PRESETS, answer, resolve_question

    args = ctx.args
    preset = args.preset or ("custom" if args.question.strip() else next(iter(PRESETS)))
    question = resolve_question(preset, args.question)
    images = [load_input_image(path).image for path in args.image]
    settings = GenerationSettings(**{k: getattr(args, k) for k in UNDERSTAND_SETTINGS if getattr(args, k) is not None})
    settings.validate()
    pipe = ctx.pipeline()

    from tqdm import tqdm

    with tqdm(total=settings.max_new_tokens, unit="token", disable=None, file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        # The pipeline (not its model) is passed so that its memory mode places the MLLM.
        reply = answer(pipe, question, images=images or None, system_prompt=args.system_prompt,
                       settings=settings, callback=progress)
    print(reply)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# batch


@dataclass
class Row:
    """One batch row as read: its number, where it is, its id and its converted values."""

    index: int  # 1-based, counting rows (not lines)
    where: str  # "prompts.csv line 4"
    id: str
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Rows of a ``.jsonl``/``.ndjson`` (one JSON object per line; ``#`` lines are comments),
    ``.json`` (a list of objects), ``.csv`` or ``.tsv`` file (a header of field names).

    Paths in ``images`` / ``init_image`` are relative to the rows file's folder. Problems in a row
    are kept on the row (the batch goes on without it); an unreadable file is a ``UsageError``.
    """
    path = Path(path)
    base_dir = path.parent
    ext = path.suffix.lower()
    try:
        if ext in (".csv", ".tsv"):
            # utf-8-sig: spreadsheets like to start CSV files with a byte order mark.
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if ext == ".tsv" else ",")
                records = []
                for record in reader:
                    extra = record.pop(None, None)  # cells beyond the header
                    where = f"{path.name} line {reader.line_num}"
                    records.append((where, record, [("row", f"{len(extra)} more cell(s) than header columns")]
                                    if extra and any(c.strip() for c in extra) else []))
            return _make_rows(records, text=True, base_dir=base_dir)
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"Cannot read the rows file {path}: {exc}") from exc
    if ext == ".json":
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc}); use a list of objects, or JSONL.") from exc
        if not isinstance(data, list):
            raise UsageError(f"{path}: a .json rows file must hold a list of objects (or use .jsonl).")
        return _make_rows([(f"{path.name} item {i}", obj, []) for i, obj in enumerate(data, 1)], False, base_dir)
    records = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", "//")):
            continue
        where = f"{path.name} line {line_no}"
        try:
            records.append((where, json.loads(line), []))
        except ValueError as exc:
            records.append((where, {}, [("row", f"not valid JSON: {exc}")]))
    return _make_rows(records, text=False, base_dir=base_dir)


def _make_rows(records, text: bool, base_dir: Path) -> list[Row]:
    rows, seen = [], {}
    for index, (where, data, problems) in enumerate(records, 1):
        row = Row(index, where, f"row{index:04d}", problems=list(problems))
        if not isinstance(data, dict):
            row.problems.append(("row", f"expected a JSON object, got {type(data).__name__}"))
            rows.append(row)
            continue
        names = {}
        for raw_key, value in data.items():
            key = str(raw_key or "").strip().lower().replace("-", "_").replace(" ", "_")
            if not key or key.startswith(("_", "#")):
                continue  # comment column, or the empty header of a trailing CSV comma
            if key in ROW_NAME_KEYS:
                if value not in (None, ""):
                    names[key] = value
                continue
            if key not in _ALIASES:
                close = difflib.get_close_matches(key, [*_ALIASES, *ROW_NAME_KEYS], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                row.problems.append((str(raw_key), f"unknown field{hint}; allowed: {', '.join([*FIELDS, *ROW_NAME_KEYS])}"))
                continue
            name = _ALIASES[key]
            try:
                converted = coerce(name, value, text=text, base_dir=base_dir)
            except ValueError as exc:
                row.problems.append((name, str(exc)))
                continue
            if converted is not None:
                row.values[name] = converted
        name = names.get("id", names.get("name"))
        if name is not None:
            row.id = safe_name(name)
            if not row.id:
                row.problems.append(("id", f"{name!r} gives an empty file name; use letters, digits, '.', '_', '-'"))
                row.id = f"row{index:04d}"
        if row.id in seen:
            row.problems.append(("id", f"{row.id!r} is already used by row {seen[row.id]}; ids name the output "
                                       f"files, so they must be unique"))
        else:
            seen[row.id] = index
        rows.append(row)
    return rows


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # row id -> error
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [f"{len(self.done)} done, {len(self.skipped)} skipped (already rendered), {len(self.failed)} failed "
                 f"in {self.seconds:.1f}s"]
        lines += [f"  FAILED {row_id}: " + error.replace("\n", "\n    ") for row_id, error in self.failed.items()]
        return "\n".join(lines)


def output_names(job: Job) -> list[str]:
    """A batch row's output files: deterministic, so a rerun can see what is already done."""
    return [f"{job.id}_{k}.png" for k in range(job.num_images)]


def _comparable(parameters: dict) -> dict:
    """Parameters that decide the pixels: a new tbac_core version or a renamed model folder do not."""
    result = {k: v for k, v in parameters.items() if k not in ("tbac_core_version", "image_index")}
    result["model"] = {k: v for k, v in (parameters.get("model") or {}).items() if k != "name"}
    return result


def already_done(job: Job, out_dir: Path, expected: dict | None) -> bool:
    """True when every output of ``job`` exists and was made with the same parameters.

    ``expected``: the parameters the job would record (index aside), or None to only check that
    the files exist. Files are written via temp + rename, so an existing file is complete.
    """
    for name in output_names(job):
        path = out_dir / name
        if not path.is_file():
            return False
        if expected is not None:
            try:
                if _comparable(read_parameters(path)) != expected:
                    return False
            except TBACError:
                return False
    return True


def expected_parameters(job: Job, model, load_image: Callable[[str], InputImage]) -> dict:
    """What ``render`` would record for ``job`` (sizes resolved without running anything)."""
    inputs = [load_image(path) for path in job.images]
    init = load_image(job.init_image) if job.init_image else None
    if init is not None:
        width, height = fit_init_image(init.image, job.width, job.height, model.vae_scale_factor).size
    else:
        default = model.config.default_image_size
        width, height = job.width or default, job.height or default
    return _comparable(job_parameters(job, model, width, height, inputs, init, 0))


class _ImageCache:
    """Input images of recent rows, keyed by path + modification time (rows often share images)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: dict[tuple, InputImage] = {}

    def __call__(self, path: str) -> InputImage:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._items:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = load_input_image(path)
        return self._items[key]


def run_batch(pipe, rows: list[Row], defaults: dict[str, Any], out_dir: Path, *, force: bool = False,
              log: Callable[[str], None] = CommandContext.log) -> BatchSummary:
    """Render every row (its values over ``defaults``) into ``out_dir``; one row failing does not stop
    the others. Rows whose outputs exist with the same parameters are skipped unless ``force``.
    Each finished row is appended to ``out_dir/batch_manifest.jsonl`` (row id, status, outputs,
    error, seconds).
    """
    from tqdm import tqdm

    from ..io.files import atomic_write

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    summary = BatchSummary()
    load_image = _ImageCache()

    def record(row: Row, status: str, outputs=(), error=None, seconds=0.0) -> None:
        entry = {"id": row.id, "row": row.index, "where": row.where, "status": status, "outputs": list(outputs),
                 "error": error, "seconds": round(seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(manifest, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if status == "failed":
            summary.failed[row.id] = error
            log(f"row {row.index} ({row.where}, id {row.id}) failed:\n  " + error.replace("\n", "\n  "))
        else:
            (summary.done if status == "done" else summary.skipped).append(row.id)

    # Check every row before rendering any, so that bad rows are reported at once.
    todo: list[tuple[Row, Job, dict | None]] = []
    for row in rows:
        problems = list(row.problems)
        try:  # the fields that could be read are checked too: one report lists all of a row's problems
            job = make_job({**defaults, **row.values}, job_id=row.id, where=row.where)
            problems += check_job(job, pipe.model)
        except JobError as exc:
            problems += exc.problems
        if problems:
            record(row, "failed", error="\n".join(f"{name}: {message}" for name, message in problems))
            continue
        try:
            expected = expected_parameters(job, pipe.model, load_image)
        except (TBACError, OSError) as exc:
            record(row, "failed", error=str(exc))
            continue
        if not force and already_done(job, out_dir, expected):
            record(row, "skipped", output_names(job))
            continue
        todo.append((row, job, expected))

    bar = tqdm(total=len(todo), unit="row", disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        for row, job, _ in todo:
            bar.set_postfix_str(row.id)
            row_started = time.perf_counter()

            def progress(info, row_id=row.id) -> None:
                bar.set_postfix_str(f"{row_id} step {info.index + 1}/{info.total}")

            try:
                results = render(pipe, job, load_image=load_image, callback=progress)
                names = output_names(job)
                for name, (image, parameters) in zip(names, results):
                    atomic_write(str(out_dir / name), encode_png(image, parameters))
            except Exception as exc:  # noqa: BLE001
                # One bad row (a corrupt image, out of memory, NaN output) must not stop the batch;
                # Ctrl-C (KeyboardInterrupt) still does.
                record(row, "failed", error=f"{type(exc).__name__}: {exc}",
                       seconds=time.perf_counter() - row_started)
            else:
                record(row, "done", names, seconds=time.perf_counter() - row_started)
            bar.update(1)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def add_batch_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", parents=[model_options()], help="Render every row of a JSONL or CSV file; resumable.",
        description="Render one job per row of a JSONL/CSV file. Row fields: id (or name), "
                    + ", ".join(FIELDS) + " (images: paths relative to the rows file, separated by ';' in CSV). "
                    "Flags below are the defaults for fields a row leaves out. Outputs are <id>_<k>.png "
                    "(rows without an id are row0001, row0002, ...); rerunning skips rows whose outputs exist "
                    "with the same parameters. A failing row is reported and the others go on; the exit "
                    "status is then 1.")
    parser.add_argument("rows", help="A .jsonl / .ndjson / .json / .csv / .tsv file, one job per row.")
    add_job_options(parser, tuple(FIELDS), " (defaults for every row)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR", help=f"Output folder (default {DEFAULT_OUT}).")
    group.add_argument("--force", action="store_true", help="Render every row again, even those already done.")
    parser.set_defaults(handler=run_batch_command)


def run_batch_command(ctx: CommandContext) -> int:
    args = ctx.args
    rows = read_rows(args.rows)
    if not rows:
        raise UsageError(f"{args.rows} holds no rows.")
    defaults = {**checkpoint_job_defaults(ctx.pipeline()), **job_values_from_args(args, tuple(FIELDS))}
    summary = run_batch(ctx.pipeline(), rows, defaults, Path(args.out), force=args.force, log=ctx.log)
    ctx.log(summary.format())
    ctx.log(f"Manifest: {Path(args.out) / MANIFEST_NAME}")
    return EXIT_OK if summary.ok else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Entry point

def add_train_parser(subparsers) -> None:
    from ..training.cli import add_parser

    add_parser(subparsers)


COMMANDS: tuple[Callable, ...] = (add_generate_parser, add_edit_parser, add_understand_parser, add_batch_parser,
                                  add_train_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tbac_core",
        description="TBAC-UniImage without ComfyUI: generate, edit and understand images, render batches.",
        epilog="Run 'python -m tbac_core <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"tbac_core {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, *, pipeline=None) -> int:
    """Run the command line; returns the exit status.

    ``pipeline``: an already loaded ``TBACPipeline`` to use instead of loading the model options
    (for programs that embed the CLI, and tests).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(CommandContext(args, pipeline))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, InvalidParameterError, LayerSpecError) as exc:  # what was asked cannot be done
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TBACError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
