"""``batch``: render every row of a JSONL/CSV file; resumable, one failing row does not stop the rest."""
from __future__ import annotations

from pathlib import Path

from ...errors import UsageError
from ..batch import MANIFEST_NAME, run_batch
from ..context import CommandContext
from ..jobs import FIELDS, add_job_options, job_values_from_args
from ..options import model_options
from ..rows import read_rows
from .generate import DEFAULT_OUT

EXIT_OK, EXIT_FAILED = 0, 1


def add_batch_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", parents=[model_options()], help="Render every row of a JSONL or CSV file; resumable.",
        description="Render one job per row of a JSONL/CSV file. Row fields: id (or name), "
                    + ", ".join(FIELDS) + " (images: paths relative to the rows file, separated by ';' in CSV). "
                    "Flags below are the defaults for fields a row leaves out. Outputs are <id>_<k>.png "
                    "(rows without an id are row0001, row0002, ...); rerunning skips rows whose outputs exist "
                    "with the same parameters, without loading the model when all are done. A failing row is "
                    "reported and the others go on; the exit status is then 1.")
    parser.add_argument("rows", help="A .jsonl / .ndjson / .json / .csv / .tsv file, one job per row.")
    add_job_options(parser, tuple(FIELDS), " (defaults for every row)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR", help=f"Output folder (default {DEFAULT_OUT}).")
    group.add_argument("--force", action="store_true", help="Render every row again, even those already done.")
    group.add_argument("--throughput", type=int, default=1, metavar="N",
                       help="Denoise up to N text-to-image rows that differ only in prompt and seed as one DiT batch "
                            "(faster per image; each row keeps its own seed's images; rows with step caching, edits "
                            "and image-to-image render alone). Checked against the free memory before the first "
                            "step. Default 1: row by row.")
    parser.set_defaults(handler=run_batch_command)


def run_batch_command(ctx: CommandContext) -> int:
    args = ctx.args
    rows = read_rows(args.rows)
    if not rows:
        raise UsageError(f"{args.rows} holds no rows.")
    info = ctx.info()
    defaults = {**info.job_defaults, **job_values_from_args(args, tuple(FIELDS))}
    summary = run_batch(rows, defaults, Path(args.out), info=info, pipeline=ctx.pipeline, force=args.force,
                        skip_without_model=args.dtype == "auto", log=ctx.log, throughput=args.throughput)
    ctx.log(summary.format())
    ctx.log(f"Manifest: {Path(args.out) / MANIFEST_NAME}")
    return EXIT_OK if summary.ok else EXIT_FAILED
