"""Helpers shared by the benchmark scripts: machine facts, memory readings, timing summaries, tables."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

MODELS_DIR = Path(__file__).resolve().parent / "models"  # make_random_checkpoint.py writes them here
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# -- command line of the single-process benchmarks -------------------------------------------------
def add_model_options(parser) -> None:
    """``--model``, ``--dtype``, ``--threads`` and ``--out`` (see ``model_checkpoint``)."""
    parser.add_argument("--model", default="medium", help="medium, real, or a checkpoint folder")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")


def model_checkpoint(model: str) -> Path:
    """``--model``: a benchmark model's checkpoint (medium, real: bench/models/NAME/checkpoint), or a folder."""
    return MODELS_DIR / model / "checkpoint" if model in ("medium", "real") else Path(model)


def one_call_benchmark_arguments(doc: str, argv, size: int, repeats: int, add_arguments=None):
    """The command line of the benchmarks that time one call in variants, alternating (decode_bench,
    native_step_bench, attention_bench): the model options, ``--size``, ``--repeats`` and whatever
    ``add_arguments(parser)`` adds -> (args, parser). Sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--size", type=int, default=size, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=repeats)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    return args, parser


def cpu_pipeline(args, parser):
    """``--model`` loaded on the CPU in ``--dtype`` -> (checkpoint folder, pipeline without a request cache);
    refuses a ``--size`` that is not a multiple of the model's VAE factor."""
    from tbac_core import TBACPipeline

    checkpoint = model_checkpoint(args.model)
    pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype=args.dtype, cache_size=0)
    if args.size % pipe.model.vae_scale_factor:
        parser.error(f"--size must be a multiple of {pipe.model.vae_scale_factor}")
    return checkpoint, pipe


def run_facts(what: str, args, checkpoint: Path) -> dict:
    """The head of a one-call benchmark's result: what it measured, on which model, settings and machine."""
    return {"what": what, "date": datetime.date.today().isoformat(), "model": str(checkpoint), "dtype": args.dtype,
            "threads": args.threads, "size": args.size, "repeats": args.repeats, "machine": machine_facts()}


# -- memory of this process -----------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Resident set size now."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss
    return kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since ``reset_peak_rss``."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS, and cannot be reset
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to clear_refs); False where impossible."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def tensor_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once (tied heads).

    Counted per tensor, not per storage: a tensor mapped from a checkpoint is a view of a storage
    spanning the whole file.
    """
    seen: set[tuple] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen.add((tensor.device.type, tensor.data_ptr(), tensor.numel() * tensor.element_size()))
    return sum(nbytes for _, _, nbytes in seen)


# -- time -------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(store: list, device="cpu"):
    """Append the seconds the block took (after the device finished its queued work) to ``store``."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    store.append(time.perf_counter() - start)


class Seconds(NamedTuple):
    wall: float
    cpu: float  # the process's CPU time (steadier than wall time on a shared machine with one thread)


def wall_and_cpu_seconds(call) -> Seconds:
    """Run ``call()`` once -> its wall seconds and the process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return Seconds(time.perf_counter() - wall, time.process_time() - cpu)


def alternating(variants: dict, repeats: int) -> tuple[dict[str, list[Seconds]], dict]:
    """Run each variant's call in turn, ``repeats`` rounds after one uncounted warm-up round (it pages
    the weights in and fills caches) -> (seconds per variant, each variant's last output)."""
    times: dict[str, list[Seconds]] = {name: [] for name in variants}
    outputs = {}
    for round_index in range(repeats + 1):
        for name, call in variants.items():
            seconds = wall_and_cpu_seconds(lambda: outputs.__setitem__(name, call()))
            if round_index:
                times[name].append(seconds)
    return times, outputs


def timing_rows(result: dict, times: dict[str, list[Seconds]], labels: dict[str, str]) -> list[list[str]]:
    """Per variant, store ``{name}_s`` / ``{name}_cpu_s`` (medians) and ``{name}_all_s`` (every wall time) in
    ``result`` -> markdown rows: label, median wall, wall range, median CPU."""
    rows = []
    for name, pairs in times.items():
        wall, cpu = (list(column) for column in zip(*pairs))
        result[f"{name}_s"], result[f"{name}_cpu_s"] = statistics.median(wall), statistics.median(cpu)
        result[f"{name}_all_s"] = wall
        rows.append([labels.get(name, name), f"{result[name + '_s']:.3f}", f"{min(wall):.3f}-{max(wall):.3f}",
                     f"{result[name + '_cpu_s']:.3f}"])
    return rows


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in 0..1 against the reference (inf when identical)."""
    mse = float(((images.float() - reference.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "values": [round(v, 6) for v in values],
    }


def test_image(size: int):
    """A deterministic ``size`` x ``size`` RGB picture with structure (gradients and a disc), no file needed."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.04
    rgb = np.stack([x, y, 1 - x], axis=-1)
    rgb[disc] = [0.9, 0.2, 0.1]
    return Image.fromarray((rgb * 255).astype("uint8"), "RGB")


# -- facts ------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine_facts() -> dict:
    facts = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _meminfo_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "diffusers": _version("diffusers"),
        "accelerate": _version("accelerate"),
        "safetensors": _version("safetensors"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                     gpu_multiprocessors=props.multi_processor_count)
    return facts


def _meminfo_total() -> int | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


# -- output -----------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def gib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1024**3:.2f} GiB"


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1024**2:.0f} MiB"


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
