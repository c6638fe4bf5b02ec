"""Rendering batch rows: check every row first, skip rows already done, record each row in a manifest.

Resuming: outputs are ``<id>_<k>.png`` and carry their parameters, so a rerun compares them with
what each row would record. When every row is already done (same job, same checkpoint config),
the model is not even loaded; otherwise it loads once and the comparison includes the model's
weight fingerprint.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidParameterError, JobError, TBACError
from ..io import atomic_write, encode_png, read_parameters
from ..params import MAX_BATCH
from .checkpoint_info import CheckpointInfo
from .images import ImageCache, InputImage
from .jobs import Job, check_job, check_layers, make_job
from .render import (
    batch_key,
    job_parameters,
    job_record,
    output_size,
    render,
    render_together,
)
from .rows import Row

MANIFEST_NAME = "batch_manifest.jsonl"
logger = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # row id -> error
    seconds: float = 0.0
    model_loaded: bool = False

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


def comparable(parameters: dict, *, with_model: bool = True) -> dict:
    """The parameters that decide the pixels: a new tbac_core version or a renamed model folder do not.

    ``with_model``: compare the loaded model's fingerprint and dtype; without it, the checkpoint's
    config hash stands for the model (that is all one can know before loading it).
    """
    result = {k: v for k, v in parameters.items() if k not in ("tbac_core_version", "image_index", "block_rungs")}
    model = parameters.get("model") or {}
    if with_model:
        result["block_rungs"] = parameters.get("block_rungs")
        result["model"] = {k: v for k, v in model.items() if k not in ("name", "config_sha256")}
    else:
        result["model"] = {"config_sha256": model.get("config_sha256")} if isinstance(model, dict) else None
    return result


def already_done(job: Job, out_dir: Path, expected: dict, *, with_model: bool = True) -> bool:
    """True when every output of ``job`` exists and was made with the ``expected`` parameters.

    Files are written via temp + rename, so an existing file is complete.
    """
    for name in output_names(job):
        path = out_dir / name
        if not path.is_file():
            return False
        try:
            if comparable(read_parameters(path), with_model=with_model) != expected:
                return False
        except (TBACError, AttributeError):  # AttributeError: a record whose "model" is not an object
            return False
    return True


class Manifest:
    """``batch_manifest.jsonl``: one line per finished row (id, status, outputs, error, seconds)."""

    def __init__(self, out_dir: Path, summary: BatchSummary, log: Callable[[str], None]):
        self.path = out_dir / MANIFEST_NAME
        self.summary = summary
        self.log = log

    def record(self, row: Row, status: str, outputs=(), error=None, seconds=0.0) -> None:
        entry = {"id": row.id, "row": row.index, "where": row.where, "status": status, "outputs": list(outputs),
                 "error": error, "seconds": round(seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if status == "failed":
            self.summary.failed[row.id] = error
            self.log(f"row {row.index} ({row.where}, id {row.id}) failed:\n  " + error.replace("\n", "\n  "))
        else:
            (self.summary.done if status == "done" else self.summary.skipped).append(row.id)


@dataclass
class _Checked:
    row: Row
    job: Job
    inputs: list[InputImage]
    init: InputImage | None
    size: tuple[int, int]


def _problems_text(problems: list[tuple[str, str]]) -> str:
    return "\n".join(f"{name}: {message}" for name, message in problems)


def run_batch(rows: list[Row], defaults: dict[str, Any], out_dir: Path, *, info: CheckpointInfo,
              pipeline: Callable[[], Any], force: bool = False, skip_without_model: bool = True,
              log: Callable[[str], None] = print, throughput: int = 1) -> BatchSummary:
    """Render every row (its values over ``defaults``) into ``out_dir``; one row failing does not stop
    the others. Rows whose outputs exist with the same parameters are skipped unless ``force``.

    ``pipeline``: returns the loaded ``TBACPipeline`` (called only when something must render).
    ``skip_without_model``: a rerun whose rows are all done skips them without loading the model.
    ``throughput``: up to this many text-to-image rows that differ only in prompt and seed are
    denoised as one DiT batch (``render.batch_key``); each keeps the images it gets alone (float
    rounding aside). 1 renders row by row.
    """
    check_throughput(throughput)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary()
    manifest = Manifest(out_dir, summary, log)
    load_image = ImageCache()

    # 1. Every row is checked from config.json alone before the model loads; bad rows are reported at once.
    checked: list[_Checked] = []
    for row in rows:
        problems = list(row.problems)
        try:  # the fields that could be read are checked too: one report lists all of a row's problems
            job = make_job({**defaults, **row.values}, job_id=row.id, where=row.where)
            problems += check_job(job, info.latent_factor)
        except JobError as exc:
            problems += exc.problems
        if problems:
            manifest.record(row, "failed", error=_problems_text(problems))
            continue
        try:
            inputs = [load_image(path) for path in job.images]
            init = load_image(job.init_image) if job.init_image else None
        except (TBACError, OSError) as exc:
            manifest.record(row, "failed", error=str(exc))
            continue
        checked.append(_Checked(row, job, inputs, init, output_size(job, info, init)))

    # 2. All done with this checkpoint config already: nothing to load.
    def light_expected(item: _Checked) -> dict:
        record = job_record(item.job, *item.size, item.inputs, item.init)
        return comparable({**record, "model": {"config_sha256": info.config_sha256}}, with_model=False)

    if (not force and skip_without_model and checked
            and all(already_done(c.job, out_dir, light_expected(c), with_model=False) for c in checked)):
        for item in checked:
            manifest.record(item.row, "skipped", output_names(item.job))
        summary.seconds = time.perf_counter() - started
        return summary

    # 3. The model: the layer specs (they need its counts), the full comparison, then rendering.
    todo: list[_Checked] = []
    if checked:
        pipe = pipeline()
        summary.model_loaded = True
        for item in checked:
            problems = check_layers(item.job, pipe.model.identity)
            if problems:
                manifest.record(item.row, "failed", error=_problems_text(problems))
                continue
            expected = comparable(job_parameters(item.job, pipe.model, info, *item.size, item.inputs, item.init, 0))
            if not force and already_done(item.job, out_dir, expected):
                manifest.record(item.row, "skipped", output_names(item.job))
            else:
                todo.append(item)
    if todo:
        _render_rows(pipe, todo, info, out_dir, manifest, load_image, throughput, log)
    summary.seconds = time.perf_counter() - started
    return summary


def check_throughput(throughput: int) -> None:
    """``throughput`` rows per DiT batch: 1 .. MAX_BATCH (the images of a batch are checked again per group)."""
    if isinstance(throughput, bool) or not isinstance(throughput, int) or not 1 <= throughput <= MAX_BATCH:
        raise InvalidParameterError(f"throughput must be a whole number of rows in 1..{MAX_BATCH} (1 = row by row), "
                                    f"got {throughput!r}.")


def throughput_groups(todo: list[_Checked], throughput: int) -> list[list[_Checked]]:
    """Rows to denoise together, in first-row order: up to ``throughput`` rows of one ``batch_key``
    (and at most ``MAX_BATCH`` images); rows without a key are groups of one."""
    groups: list[list[_Checked]] = []
    open_groups: dict[tuple, list[_Checked]] = {}
    for item in todo:
        key = batch_key(item.job) if throughput > 1 else None
        group = open_groups.get(key) if key is not None else None
        if group is None or len(group) >= throughput or (len(group) + 1) * item.job.num_images > MAX_BATCH:
            group = [item]
            groups.append(group)
            if key is not None:
                open_groups[key] = group
        else:
            group.append(item)
    return groups


def _render_rows(pipe, todo: list[_Checked], info: CheckpointInfo, out_dir: Path, manifest: Manifest,
                 load_image: ImageCache, throughput: int = 1, log: Callable[[str], None] = print) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="row", disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        for group in throughput_groups(todo, throughput):
            if len(group) > 1 and _render_group(pipe, group, info, out_dir, manifest, bar, log):
                continue
            for item in group:
                _render_one(pipe, item, info, out_dir, manifest, load_image, bar)
    finally:
        bar.close()


def _render_group(pipe, group: list[_Checked], info: CheckpointInfo, out_dir: Path, manifest: Manifest,
                  bar, log: Callable[[str], None]) -> bool:
    """Denoise a throughput group as one batch and record each row; False: it failed (a batch too large
    for the free memory is refused before its first step) and its rows must render one by one."""
    ids = ", ".join(item.row.id for item in group)
    bar.set_postfix_str(f"{len(group)} rows together")
    started = time.perf_counter()

    def progress(step) -> None:
        bar.set_postfix_str(f"{len(group)} rows together, step {step.index + 1}/{step.total}")

    try:
        results = render_together(pipe, [item.job for item in group], info, callback=progress)
        for item, outputs in zip(group, results):
            for name, (image, parameters) in zip(output_names(item.job), outputs):
                atomic_write(out_dir / name, encode_png(image, parameters))
    except Exception as exc:  # deliberate: the rows get their own chance (and their own error) alone
        logger.debug("rows %s failed together", ids, exc_info=True)
        log(f"rows {ids} could not be denoised together ({type(exc).__name__}: {exc}); rendering them one by one.")
        return False
    seconds = (time.perf_counter() - started) / len(group)
    for item in group:
        manifest.record(item.row, "done", output_names(item.job), seconds=seconds)
        bar.update(1)
    return True


def _render_one(pipe, item: _Checked, info: CheckpointInfo, out_dir: Path, manifest: Manifest,
                load_image: ImageCache, bar) -> None:
    row, job = item.row, item.job
    bar.set_postfix_str(row.id)
    row_started = time.perf_counter()

    def progress(step, row_id=row.id) -> None:
        bar.set_postfix_str(f"{row_id} step {step.index + 1}/{step.total}")

    try:
        results = render(pipe, job, info, load_image=load_image, callback=progress)
        names = output_names(job)
        for name, (image, parameters) in zip(names, results):
            atomic_write(out_dir / name, encode_png(image, parameters))
    except Exception as exc:  # noqa: BLE001
        # One bad row (a corrupt image, out of memory, NaN output) must not stop the batch;
        # Ctrl-C (KeyboardInterrupt) still does. The manifest keeps the error; --debug shows the traceback.
        logger.debug("row %s failed", row.id, exc_info=True)
        manifest.record(row, "failed", error=f"{type(exc).__name__}: {exc}",
                        seconds=time.perf_counter() - row_started)
    else:
        manifest.record(row, "done", names, seconds=time.perf_counter() - row_started)
    bar.update(1)
