#!/usr/bin/env python3
"""Real-size CPU benchmark: TBAC-UniImage-3B (random bf16 weights) in bf16, fp8 and one GGUF type.

One fresh process per weight format (``--formats bf16,fp8,q8_0``), each running, in bfloat16 on
the CPU:

1. load (``load_model``) -> seconds, peak RSS of the load against the weights' bytes;
2. text-to-image: encode (the real-size Qwen2.5 tokenizer), 2 DPM++ steps at 512x512, VAE decode;
3. an edit with one 512x512 input image: encode (vision tower + MLLM), 2 steps, decode;
4. image understanding: 8 new tokens (greedy) about one 512x512 image.

Seconds per phase and the peak RSS of every phase; the process's peak against the weights' bytes.
Before the runs, the checks the first real-size run motivated: a tokenizer whose ids differ from
the MLLM config is refused at load time (before any weight is read), and the vision-token count of
a 512x512 image follows Qwen2.5-VL's preprocessor settings (324 tokens, not the fixture's 64).

The checkpoint is ``make_random_checkpoint.py real`` (built when missing: 11.4 GB, needs ~7 GB of
RAM); the fp8 / GGUF folders are written beside it with ``python -m tbac_core quantize`` (kept for
the next run). Each worker checks the available memory first and refuses to start without
enough (the bf16 run needs ~13 GB). Writes ``results/cpu-real-<date>.json`` and prints tables.

    python bench/make_random_checkpoint.py real --tokenizer /path/to/ComfyUI/comfy/text_encoders/qwen25_tokenizer
    python bench/cpu_real_bench.py --threads 2
    python bench/cpu_real_bench.py --smoke      # the same code on tiny-real-vocab, seconds (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import benchutil as bu

FORMATS = ("bf16", "fp8", "q8_0", "q5_k", "q4_k")
PROMPT = "a lighthouse on a rocky coast at dusk, oil painting, warm light"
EDIT_PROMPT = "make the sky stormy and add a red boat"
QUESTION = "What is in this picture?"
WORKER_MARK = "CPU_REAL_BENCH_RESULT "
# Bytes a worker needs beyond the weights: Python + torch + transformers (~0.4 GB), activations of
# the 3B MLLM over ~700 tokens and of the DiT at 512x512 (~1.5 GB measured), and a margin.
HEADROOM_BYTES = 2 * 1024**3
SMOKE_HEADROOM_BYTES = 512 * 1024**2


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def folder_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".gguf"))


def require_memory(needed: int, what: str) -> None:
    """Refuse to start ``what`` when the machine has less than ``needed`` bytes available."""
    available = mem_available_bytes()
    if available is not None and available < needed:
        raise SystemExit(f"{what} needs ~{bu.gib(needed)} of RAM; only {bu.gib(available)} is available now "
                         f"(MemAvailable). Wait for other jobs to finish, then run again.")


# -- one worker process: one weight format ----------------------------------------------------
class Phases:
    """Seconds and peak RSS of consecutive phases (the kernel's peak counter reset per phase)."""

    def __init__(self):
        self.data: dict[str, dict] = {}

    def run(self, name: str, fn):
        bu.reset_peak_rss()
        start = time.perf_counter()
        value = fn()
        self.data[name] = {"seconds": time.perf_counter() - start, "peak_rss": bu.peak_rss_bytes(),
                           "rss_after": bu.rss_bytes()}
        return value


def worker(model_dir: Path, fmt: str, size: int, steps: int, tokens: int, threads: int, headroom: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from tbac_core import TBACPipeline
    from tbac_core.loading import load_model
    from tbac_core.params import GenerationSettings, SamplingParams
    from tbac_core.pipeline.understanding import generate_answer_ids

    file_bytes = folder_weight_bytes(model_dir)
    require_memory(file_bytes + headroom, f"the {fmt} run of {model_dir}")
    phases = Phases()
    rss_before = bu.rss_bytes()
    model = phases.run("load", lambda: load_model(model_dir, device="cpu", dtype="bf16"))
    weights = bu.tensor_bytes(model.mllm, model.dit, model.vae)
    pipe = TBACPipeline(model, cache_size=0)
    image = bu.test_image(size)
    params = SamplingParams(steps=steps, guidance_scale=4.5, seed=0)
    counts = {"prompt_tokens": len(model.prompts.tokenizer(PROMPT)["input_ids"])}
    cond = phases.run("t2i_encode", lambda: pipe.encode(PROMPT))
    latents = phases.run("t2i_sample", lambda: pipe.sample(cond, width=size, height=size, params=params))
    images = phases.run("t2i_decode", lambda: pipe.decode(latents))
    finite = {"t2i": bool(torch.isfinite(images).all())}
    edit_params = SamplingParams(steps=steps, guidance_scale=4.5, image_guidance_scale=1.5, seed=0)
    edit_cond = phases.run("edit_encode", lambda: pipe.encode(EDIT_PROMPT, images=[image]))
    edit_latents = phases.run("edit_sample", lambda: pipe.sample(edit_cond, width=size, height=size,
                                                                  params=edit_params))
    edit_images = phases.run("edit_decode", lambda: pipe.decode(edit_latents))
    finite["edit"] = bool(torch.isfinite(edit_images).all())
    inputs, answer = phases.run("understand", lambda: generate_answer_ids(
        pipe, QUESTION, images=[image], settings=GenerationSettings(max_new_tokens=tokens)))
    ids = inputs["input_ids"][0]
    counts.update(understand_prompt_tokens=int(ids.numel()),
                  understand_vision_tokens=int((ids == model.prompts.ids.image_pad).sum()),
                  answer_tokens=len(answer), answer_ids=[int(t) for t in answer])
    return {
        "format": fmt, "model_dir": str(model_dir), "file_bytes": file_bytes, "weights_bytes": weights,
        "rss_before_load": rss_before, "process_peak_rss": max(p["peak_rss"] for p in phases.data.values()),
        "phases": phases.data, "counts": counts, "finite": finite,
        "settings": {"size": size, "steps": steps, "tokens": tokens, "threads": threads, "dtype": "bf16"},
        "image_processor": {k: model.prompts.processor_settings.get(k) for k in ("min_pixels", "max_pixels")},
        "load_average": list(bu.machine_facts()["load_average"] or []),
    }


def load_checks(model_dir: Path, wrong_tokenizer: Path) -> dict:
    """The tokenizer-id check at load: a mismatched tokenizer is refused before any weight is read."""
    from tbac_core.errors import CheckpointError
    from tbac_core.loading import load_model

    bu.reset_peak_rss()
    before = bu.rss_bytes()
    start = time.perf_counter()
    try:
        load_model(model_dir, device="cpu", dtype="bf16", tokenizer_dir=wrong_tokenizer)
    except CheckpointError as exc:
        message = str(exc)
    else:
        raise SystemExit(f"load_model accepted the tokenizer of {wrong_tokenizer} for {model_dir}: the check is gone")
    return {"refused": True, "message": message, "seconds": time.perf_counter() - start,
            "rss_growth": bu.peak_rss_bytes() - before}


def quantize(source: Path, out: Path, fmt: str) -> dict:
    """``python -m tbac_core quantize`` in this process, for its time and peak RSS."""
    from tbac_core.cli.app import main as cli

    bu.reset_peak_rss()
    start = time.perf_counter()
    status = cli(["quantize", "--model", str(source), "--format", fmt, "--out", str(out)])
    if status != 0:
        raise SystemExit(f"quantize {fmt} exited with {status}")
    return {"format": fmt, "seconds": time.perf_counter() - start, "peak_rss": bu.peak_rss_bytes(),
            "file_bytes": folder_weight_bytes(out), "out": str(out)}


# -- the driver ---------------------------------------------------------------------------------
def run_worker(args: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], check=False, capture_output=True,
                          text=True,
                          timeout=timeout)
    marked = [line for line in done.stdout.splitlines() if line.startswith(WORKER_MARK)]
    if done.returncode != 0 or not marked:
        raise SystemExit(f"worker {' '.join(args)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-6000:]}")
    return json.loads(marked[-1][len(WORKER_MARK):])


def format_dir(checkpoint: Path, fmt: str) -> Path:
    return checkpoint if fmt == "bf16" else checkpoint.parent / f"{checkpoint.name}-{fmt}"


def tables(result: dict) -> str:
    runs = result["runs"]
    names = [("load", "load"), ("t2i_encode", "t2i encode"), ("t2i_sample", "t2i 2 steps"),
             ("t2i_decode", "t2i decode"), ("edit_encode", "edit encode (1 image)"), ("edit_sample", "edit 2 steps"),
             ("edit_decode", "edit decode"), ("understand", "understand 8 tokens")]
    header = ["phase"] + [f"{r['format']} s" for r in runs] + [f"{r['format']} peak RSS" for r in runs]
    rows = [[label] + [f"{r['phases'][key]['seconds']:.1f}" for r in runs]
            + [bu.gib(r["phases"][key]["peak_rss"]) for r in runs] for key, label in names]
    memory = [[r["format"], bu.gib(r["file_bytes"]), bu.gib(r["weights_bytes"]), bu.gib(r["rss_before_load"]),
               bu.gib(r["phases"]["load"]["peak_rss"]),
               f"{(r['phases']['load']['peak_rss'] - r['rss_before_load']) / r['weights_bytes']:.2f}x",
               bu.gib(r["process_peak_rss"]), f"{r['process_peak_rss'] / r['weights_bytes']:.2f}x"] for r in runs]
    s = runs[0]["settings"]
    lines = [(f"{result['architecture']}, bf16 compute on the CPU, {s['size']}x{s['size']}, {s['steps']} steps, "
             f"{s['threads']} torch threads, one process per format"),
             bu.markdown_table(header, rows), "",
             bu.markdown_table(["weights", "file", "loaded weights", "RSS before load", "peak RSS of load",
                                "load growth / weights", "process peak RSS", "peak / weights"], memory)]
    if result.get("quantize"):
        lines += ["", bu.markdown_table(["quantize", "seconds", "peak RSS", "written"],
                                        [[q["format"], f"{q['seconds']:.0f}", bu.gib(q["peak_rss"]),
                                          bu.gib(q["file_bytes"])] for q in result["quantize"]])]
    counts = runs[0]["counts"]
    lines += ["", (f"prompt: {counts['prompt_tokens']} tokens; understanding: {counts['understand_vision_tokens']} vision tokens for a {s['size']}x{s['size']} "
                  f"image, {counts['understand_prompt_tokens']} prompt tokens; image processor "
                  f"{runs[0]['image_processor']}")]
    if result.get("load_check"):
        check = result["load_check"]
        lines.append(f"mismatched tokenizer refused at load in {check['seconds']:.1f} s "
                     f"(RSS growth {bu.mib(check['rss_growth'])}): {check['message'][:160]}...")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=BENCH / "models", help="folder holding real/ (default %(default)s)")
    parser.add_argument("--formats", default="bf16,fp8,q8_0", help="comma list of " + ", ".join(FORMATS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="real Qwen2.5 tokenizer folder used when the checkpoint must be built")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="shared/fixtures folder (default $TBAC_FIXTURES or tests/fixtures)")
    parser.add_argument("--smoke", action="store_true", help="tiny-real-vocab instead of real (seconds; CI)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true", help="keep the formats already in --out, run the rest")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # internal: one measurement in this fresh process; prints one marked JSON line
        kind, *rest = args.worker
        if kind == "run":
            data = worker(Path(rest[0]), rest[1], int(rest[2]), args.steps, args.tokens, args.threads, int(rest[3]))
        elif kind == "check":
            data = load_checks(Path(rest[0]), Path(rest[1]))
        else:
            data = quantize(Path(rest[0]), Path(rest[1]), rest[2])
        print(WORKER_MARK + json.dumps(data, default=str), flush=True)
        return data

    import make_random_checkpoint as mrc

    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    size_name = "tiny-real-vocab" if args.smoke else "real"
    fixtures = args.fixtures or mrc.DEFAULT_FIXTURES
    spec = mrc.make_spec(size_name, fixtures)
    checkpoint = args.models / size_name / "checkpoint"
    headroom = SMOKE_HEADROOM_BYTES if args.smoke else HEADROOM_BYTES
    started = time.perf_counter()
    if not (checkpoint / "config.json").is_file():
        print(f"building {checkpoint} ...", flush=True)
        mrc.write_checkpoint(spec, args.models, fixtures=fixtures, tokenizer=args.tokenizer)
    name = "smoke-cpu-real" if args.smoke else "cpu-real"
    out = args.out or BENCH / "results" / f"{name}-{datetime.date.today().isoformat()}.json"
    if out.is_dir():
        out = out / f"{name}-{datetime.date.today().isoformat()}.json"
    result = {"date": datetime.date.today().isoformat(), "architecture": size_name, "smoke": args.smoke,
              "machine": bu.machine_facts(), "parameters": mrc.parameter_counts(spec), "quantize": [], "runs": []}
    if args.resume and out.is_file():  # keep the formats an earlier (interrupted) run measured
        result = json.loads(out.read_text())
    done = {run["format"] for run in result["runs"]}
    if "load_check" not in result:
        wrong_tokenizer = fixtures / "tbac-tiny" / mrc.TINY_QWEN  # 372-token fixture: ids 329/332
        result["load_check"] = run_worker(["--worker", "check", str(checkpoint), str(wrong_tokenizer)], args.timeout)
    for fmt in (f for f in formats if f not in done):
        folder = format_dir(checkpoint, fmt)
        if fmt != "bf16" and not (folder / "config.json").is_file():
            # quantize streams tensor by tensor: ~0.8 GiB at real size (its largest tensor, a few times)
            require_memory(headroom, f"quantize {fmt}")
            print(f"quantize {fmt} -> {folder} ...", flush=True)
            result["quantize"].append(run_worker(["--worker", "quantize", str(checkpoint), str(folder), fmt],
                                                 args.timeout))
        print(f"run {fmt} ...", flush=True)
        run = run_worker(["--threads", str(args.threads), "--steps", str(args.steps), "--tokens", str(args.tokens),
                          "--worker", "run", str(folder), fmt, str(spec.image_size), str(headroom)], args.timeout)
        result["runs"].append(run)
        print(f"  {fmt}: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in run["phases"].items()), flush=True)
        bu.write_json(out, result)  # after every format: an interrupted run keeps what it measured
    result["total_seconds"] = time.perf_counter() - started + result.get("total_seconds", 0.0)
    result["table"] = tables(result)
    print(result["table"])
    print(f"\ntotal {result['total_seconds']:.0f} s; written: {bu.write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
