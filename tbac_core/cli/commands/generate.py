"""``generate`` (text to image, image to image) and ``edit``, one job each, optionally ``--from-png``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ...errors import JobError, UsageError
from ...io import check_name_length, read_parameters, safe_name
from ..context import CommandContext
from ..images import check_image_path, file_sha256
from ..jobs import (
    EDIT_FIELDS,
    GENERATE_FIELDS,
    Job,
    add_job_options,
    check_job,
    check_layers,
    job_values_from_args,
    make_job,
)
from ..options import model_options
from ..render import render, write_new_png

DEFAULT_OUT = "outputs"
DEFAULT_PREFIX = "tbac"
EXIT_OK = 0


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", parents=[model_options()], help="Text to image (or image to image with --init-image).",
        description="Render images from a prompt; each PNG carries its parameters.")
    add_job_options(parser, GENERATE_FIELDS)
    add_output_options(parser)
    parser.set_defaults(handler=run_generate, job_fields=GENERATE_FIELDS)


def add_edit_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit", parents=[model_options()], help="Edit images following an instruction.",
        description="Edit input images (--image, repeatable) following the prompt; each PNG carries its "
                    "parameters.")
    add_job_options(parser, EDIT_FIELDS)
    add_output_options(parser)
    parser.set_defaults(handler=run_generate, job_fields=EDIT_FIELDS)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR", help=f"Output folder (default {DEFAULT_OUT}).")
    group.add_argument("--prefix", default=DEFAULT_PREFIX, help="File names are <prefix>_<seed>_<index>.png; an "
                       f"existing file is never overwritten (a -1, -2 ... suffix is added). Default: {DEFAULT_PREFIX}.")
    group.add_argument("--from-png", metavar="PNG", help="Start from the parameters stored in a PNG written by "
                       "tbac_core (other flags override them; input images must be given again).")


def values_from_png(record: dict, names: Sequence[str], path: str) -> dict[str, Any]:
    """The job values recorded in a tbac_core PNG (input images are recorded by hash only), checked
    like flags: a hand-edited record with a wrong type is an error naming the file."""
    values = {name: record[name] for name in names
              if name not in ("images", "init_image") and record.get(name) is not None}
    try:
        return job_values_from_args(argparse.Namespace(**values), tuple(values))
    except UsageError as exc:
        raise UsageError(f"{path}: the stored parameters are unusable: {exc}") from None


def run_generate(ctx: CommandContext) -> int:
    args = ctx.args
    editing = "images" in args.job_fields
    record = {}
    if args.from_png:
        check_image_path(args.from_png, "--from-png")
        record = read_parameters(args.from_png)
    values = values_from_png(record, args.job_fields, args.from_png) if args.from_png else {}
    given = job_values_from_args(args, args.job_fields)
    values.update(given)
    if args.from_png:
        if record.get("mode") == "edit" and not editing:
            raise UsageError(f"{args.from_png} is an edit; reproduce it with: edit --from-png {args.from_png} "
                             f"--image <the input image(s)>.")
        if record.get("mode") == "img2img" and not values.get("init_image"):
            raise UsageError(f"{args.from_png} was made by image-to-image; give its start image again: "
                             f"--init-image PATH.")
    if editing and not values.get("images"):
        raise UsageError("edit needs at least one input image: --image PATH (repeatable).")
    if "denoise" in given and not values.get("init_image"):
        raise UsageError("--denoise only applies to image-to-image; give --init-image PATH as well.")
    stem = f"{safe_name(args.prefix) or DEFAULT_PREFIX}_{values.get('seed', 0)}"
    check_name_length(f"{stem}_{values.get('num_images', 1) - 1}-99999.png", "--prefix")

    # Everything config.json can tell is checked before the model loads.
    info = ctx.info()
    job = make_job({**info.job_defaults, **values})
    problems = check_job(job, info.latent_factor)
    if ctx.loaded:  # the layer spec needs the model's counts: checked now only when it is there anyway
        problems += check_layers(job, ctx.pipeline().model.identity)
    if problems:
        raise JobError("command line", problems)
    pipe = ctx.pipeline()
    problems = check_layers(job, pipe.model.identity)
    if problems:
        raise JobError("command line", problems)
    if args.from_png:
        _compare_with_png(ctx, args.from_png, record, job, pipe.model)

    from tqdm import tqdm

    bar = tqdm(total=job.steps, unit="step", disable=None, file=sys.stderr, leave=False)

    def progress(step) -> None:
        bar.total = step.total
        bar.update(1)

    try:
        results = render(pipe, job, info, callback=progress)
    finally:
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_name(args.prefix) or DEFAULT_PREFIX}_{job.seed}"
    for index, (image, parameters) in enumerate(results):
        print(write_new_png(out, f"{stem}_{index}", image, parameters))
    return EXIT_OK


def _compare_with_png(ctx: CommandContext, path: str, record: dict, job: Job, model) -> None:
    """Warn when the model or input images differ from those the PNG was made with."""
    fingerprint = (record.get("model") or {}).get("fingerprint")
    if fingerprint and fingerprint != model.identity.fingerprint:
        ctx.log(f"warning: {path} was made with model {record['model'].get('name')!r} (fingerprint "
                f"{str(fingerprint)[:12]}), not with the loaded {model.identity.name!r}; the result will differ.")
    recorded = [item.get("sha256") for item in record.get("input_images") or [] if isinstance(item, dict)]
    if isinstance(record.get("init_image"), dict):
        recorded = [record["init_image"].get("sha256")]
    given = [file_sha256(p) for p in job.image_paths]
    if recorded != given:
        names = [item.get("name") for item in record.get("input_images") or [] if isinstance(item, dict)] + (
            [record["init_image"].get("name")] if isinstance(record.get("init_image"), dict) else [])
        ctx.log(f"warning: {path} was made from input image(s) {names or 'none'}; the images given now differ, "
                f"so the result will differ.")
