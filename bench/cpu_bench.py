#!/usr/bin/env python3
"""CPU benchmark on the "medium" random-weight model: time and peak memory (RSS) of each phase.

Measured, each a median over several runs:

* checkpoint load (``TBACPipeline.from_pretrained``, float32 on the CPU), in a fresh process per run,
  with its peak RSS compared to the bytes of the loaded weights (issue 8: at most 1.3x);
* MLLM conditioning (``pipe.encode``, the conditioning cache off): a first encode (every cache
  cleared: the negative prompt's row, then the prompt's) and a new prompt whose negative row is
  kept in the guidance cache (the prompt's row only);
* one sampler step (ladder DiT on both guidance rows + DPM-Solver++ step), from step callbacks;
* a full generation (encode + ``--steps`` steps with guidance + decode);
* VAE decode of one image;
* peak RSS of a generation with the model loaded.

Each phase runs in its own subprocess so peak-RSS readings do not mix. Results: a table on stdout
and ``bench/results/cpu-<date>.json``.

Usage: python bench/cpu_bench.py [--repeats 3] [--steps 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchutil as bu  # noqa: E402
from prompts import PROMPT  # noqa: E402
import torch  # noqa: E402

RESULT_TAG = "CPU-BENCH-RESULT "  # a subprocess prints its JSON result on a line starting with this


# -- phases (each runs in a fresh subprocess) -------------------------------------------------------
def phase_load(checkpoint: Path) -> dict:
    """One load: seconds, RSS before/after, peak RSS, and the bytes of the loaded weights."""
    import tbac_core.loading.build  # noqa: F401
    from tbac_core import TBACPipeline  # noqa: F401  (imports torch/transformers/diffusers first)

    gc.collect()
    before = bu.rss_bytes()
    bu.reset_peak_rss()
    start = time.perf_counter()
    pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype="fp32", cache_size=0)
    seconds = time.perf_counter() - start
    model = pipe.model
    return {
        "seconds": seconds,
        "rss_before": before,
        "rss_after": bu.rss_bytes(),
        "peak_rss": bu.peak_rss_bytes(),
        "weights_bytes": bu.tensor_bytes(model.mllm, model.dit, model.vae),
        "file_bytes": sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")),
    }


def phase_run(checkpoint: Path, repeats: int, steps: int, guidance: float) -> dict:
    """Encode, sampler steps, full generation, decode; peak RSS of the first generation."""
    from tbac_core import TBACPipeline
    from tbac_core.processing.prompt_layout import conditioning_rows

    pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype="fp32", cache_size=0)
    model = pipe.model
    gc.collect()
    rss_loaded = bu.rss_bytes()
    weights = bu.tensor_bytes(model.mllm, model.dit, model.vae)

    step_times: list[float] = []

    def on_step(info, stamps):
        stamps.append(time.perf_counter())

    generation, first_encode, encode, decode = [], [], [], []
    peak_generation = None
    for run in range(repeats):
        stamps: list[float] = []
        if run == 0:
            bu.reset_peak_rss()
        with bu.timed(generation):
            output = pipe.generate(PROMPT, steps=steps, guidance_scale=guidance, seed=run,
                                   callback=lambda info: on_step(info, stamps))
        if run == 0:
            peak_generation = bu.peak_rss_bytes()
        # Intervals between consecutive step callbacks: one DiT call on both guidance rows + one
        # scheduler step (the first step also carries the step-invariant condition embedding).
        step_times += [b - a for a, b in zip(stamps, stamps[1:])]
    latents = output.latents
    for _ in range(repeats + 2):
        pipe.clear_cache()
        with bu.timed(first_encode):
            pipe.encode(PROMPT)
        with bu.timed(encode):  # another prompt; the negative prompt's row comes from the guidance cache
            cond = pipe.encode(PROMPT + ".")
    for _ in range(repeats):
        with bu.timed(decode):
            pipe.decode(latents[:1])
    tokens = pipe.model.prompts.build_batch(
        conditioning_rows(pipe.model.prompts, [PROMPT], None, ""), model.config.system_prompt, model.metaquery_suffix()
    )["input_ids"].shape
    return {
        "first_encode_seconds": bu.summary(first_encode),
        "encode_seconds": bu.summary(encode),
        "step_seconds": bu.summary(step_times),
        "generation_seconds": bu.summary(generation),
        "decode_seconds": bu.summary(decode),
        "rss_loaded": rss_loaded,
        "peak_rss_generation": peak_generation,
        "weights_bytes": weights,
        "mllm_rows_tokens": list(tokens),
        "rungs_per_encode": int(cond.sources[0].positive.shape[0]),
        "image_size": list(output.tensors.shape[1:3]),
    }


def _run_phase(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, str(Path(__file__).resolve()), *args, "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"phase {args} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# -- orchestration -----------------------------------------------------------------------------------
def ensure_checkpoint(size: str, models: Path) -> tuple[Path, float | None]:
    import make_random_checkpoint as mrc

    checkpoint = models / size / "checkpoint"
    if (checkpoint / "config.json").is_file():
        return checkpoint, None
    start = time.perf_counter()
    mrc.write_checkpoint(mrc.make_spec(size), models)
    return checkpoint, time.perf_counter() - start


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=("tiny", "medium"))
    parser.add_argument("--models", type=Path, default=BENCH / "models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/cpu-<date>.json)")
    parser.add_argument("--phase", choices=("load", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.phase == "load":
        print(RESULT_TAG + json.dumps(phase_load(args.checkpoint)))
        return None
    if args.phase == "run":
        print(RESULT_TAG + json.dumps(phase_run(args.checkpoint, args.repeats, args.steps, args.guidance)))
        return None

    checkpoint, build_seconds = ensure_checkpoint(args.size, args.models)
    import make_random_checkpoint as mrc

    spec = mrc.make_spec(args.size)
    loads = [_run_phase(["--phase", "load", "--checkpoint", str(checkpoint)], args.threads)
             for _ in range(args.load_repeats)]
    run = _run_phase(["--phase", "run", "--checkpoint", str(checkpoint), "--repeats", str(args.repeats),
                      "--steps", str(args.steps), "--guidance", str(args.guidance)], args.threads)

    weights = loads[0]["weights_bytes"]
    load_peak = max(r["peak_rss"] for r in loads)
    load_growth = max(r["peak_rss"] - r["rss_before"] for r in loads)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": bu.machine_facts(),
        "model": {
            "size": args.size,
            "checkpoint": str(checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint),
            "parameters": mrc.parameter_counts(spec),
            "storage_dtypes": spec.storage,
            "file_bytes": loads[0]["file_bytes"],
            "image_size": spec.image_size,
            "num_metaqueries": spec.num_metaqueries,
            "build_seconds": build_seconds,
        },
        "settings": {"dtype": "float32", "device": "cpu", "steps": args.steps, "guidance_scale": args.guidance,
                     "sampler": "dpm++", "batch": 1, "repeats": args.repeats, "load_repeats": args.load_repeats,
                     "prompt": PROMPT},
        "load": {
            "seconds": bu.summary([r["seconds"] for r in loads]),
            "weights_bytes": weights,
            "rss_before": [r["rss_before"] for r in loads],
            "peak_rss": [r["peak_rss"] for r in loads],
            "rss_after": [r["rss_after"] for r in loads],
            "peak_rss_over_weights": load_peak / weights,
            "peak_rss_growth_over_weights": load_growth / weights,
        },
        "run": run,
    }
    result["table"] = table(result)
    print(machine_lines(result["machine"]))
    print(result["table"])
    out = args.out or BENCH / "results" / f"cpu-{result['date']}.json"
    print(f"\nwritten: {bu.write_json(out, result)}")
    return result


def machine_lines(facts: dict) -> str:
    return (f"machine: {facts['cpu']}, {facts['cpus_usable']} usable cores, torch threads {facts['torch_threads']}, "
            f"{bu.gib(facts['memory_total_bytes'])} RAM; Python {facts['python']}, torch {facts['torch']}, "
            f"transformers {facts['transformers']}, diffusers {facts['diffusers']}")


def table(result: dict) -> str:
    run, load, model, settings = result["run"], result["load"], result["model"], result["settings"]
    size = f"{model['image_size']}x{model['image_size']}"

    def row(name, stats):
        return [name, f"{stats['median']:.3f} s", f"{stats['min']:.3f}-{stats['max']:.3f}", stats["runs"]]

    rows = [
        row("checkpoint load (fp32, fresh process)", load["seconds"]),
        row(f"MLLM conditioning, first (negative + prompt rows, {run['mllm_rows_tokens'][1]} tokens/row)",
            run["first_encode_seconds"]),
        row("MLLM conditioning, a new prompt (the negative row cached)", run["encode_seconds"]),
        row("one sampler step (DiT x 2 guidance rows + DPM++)", run["step_seconds"]),
        row(f"full generation ({settings['steps']} steps, guidance {settings['guidance_scale']}, {size})",
            run["generation_seconds"]),
        row(f"VAE decode (1 image, {size})", run["decode_seconds"]),
    ]
    lines = [bu.markdown_table(["phase", "median", "min-max", "runs"], rows), ""]
    weights = load["weights_bytes"]
    memory = [
        ["loaded weights (fp32)", bu.mib(weights), ""],
        ["RSS before load (imports done)", bu.mib(max(load["rss_before"])), ""],
        ["peak RSS of load", bu.mib(max(load["peak_rss"])),
         f"{load['peak_rss_over_weights']:.2f}x weights; growth {load['peak_rss_growth_over_weights']:.2f}x weights"],
        ["RSS with the model loaded", bu.mib(run["rss_loaded"]), ""],
        ["peak RSS of a generation", bu.mib(run["peak_rss_generation"]),
         f"+{bu.mib(run['peak_rss_generation'] - run['rss_loaded'])} over loaded"],
    ]
    lines.append(bu.markdown_table(["memory", "value", "note"], memory))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
