#!/usr/bin/env python3
"""GPU benchmark: TBAC-UniImage-3B architecture with random bf16 weights, plus a bf16-vs-fp32 parity check.

On a CUDA machine (no download: the published architecture is built on the meta device and given
random weights drawn straight on the GPU, see ``make_random_checkpoint.build_random_model``):

* 512x512, 30 steps, guidance 4.5 (DPM++), batch 1 / 4 / 16 distinct prompts, memory modes ``full``
  and ``offload-mllm``: seconds per image, MLLM encode time (in ``offload-mllm`` it includes moving
  the MLLM to the GPU and back), per-step time, VAE decode time, peak VRAM
  (``torch.cuda.max_memory_allocated``), VRAM at rest, and the VRAM the pipeline still holds after
  the runs (its caches wait in host memory: ~0 expected);
* quantised weights (``--weights``, default fp8 and GGUF Q8_0): the same model with the MLLM's decoder
  linears and the DiT blocks' attention linears quantised on the GPU (``build_random_model(...,
  quantization=...)``, the layers ``load_model`` puts in), memory mode ``full``, same batches;
* parity on the tiny fixture: the golden text-to-image case run in bf16 (and in fp32) on the device
  against fp32 on the CPU; max abs difference of the final latents and of the decoded images,
  checked against the tolerances stated below.

``--smoke`` runs the same code on the CPU with the tiny architecture, 2 steps and batches 1/2 (a few
seconds), fp8 and Q8_0 included, so CI proves every path of the script before a GPU is lent. ``--load-checkpoint DIR`` also times
``tbac_core.load_model`` of a checkpoint folder (e.g. the real release) onto the device.

Writes ``bench/results/gpu-<gpu name>-<date>.json`` (``--out`` to choose) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import re
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import itertools
import statistics

import benchutil as bu
import make_random_checkpoint as mrc
import torch
from accelerations import acceleration_label, parse_accelerated

# Parity tolerances: difference against fp32 on the CPU (tiny fixture, golden t2i case, 8 steps,
# latents std ~1.7, images in 0..1). bf16 keeps 8 mantissa bits (relative step 2^-8). bf16 on the
# CPU differs from fp32 on the CPU by 0.048 (latents, max) on both CPUs measured; the images by
# 0.033 (max) on an Intel Xeon with AMX and by 0.116 max / 0.0027 mean on an AMD EPYC (AVX-512
# BF16, no AMX): other kernels round elsewhere, and a few pixels at sharp edges carry it. A single
# pixel's maximum is too fragile to judge a path by, so images are judged by their mean too. The
# bounds sit ~2-3x above those figures and below what a wrong path gives on this case (fp32:
# guidance 1 instead of 4.5: latents 1.25, images mean 0.082; another seed: mean 0.16; one step
# fewer: latents 0.105, images mean 0.0082). fp32 on another device differs only by summation
# order (TF32 is switched off for the check).
TOLERANCE = {
    "bf16": {"latents": 0.15, "images": 0.25, "images_mean": 0.006},
    "fp32": {"latents": 1e-3, "images": 1e-3, "images_mean": 1e-4},
}
GOLDEN_CASE = {  # shared/fixtures/tbac-tiny/goldens: case "t2i"
    "prompts": ["a red cat sitting on a blue chair", "a small green house next to the river"],
    "seed": 42, "steps": 8, "guidance_scale": 4.5,
}
GOLDEN_TOLERANCE = 1e-4  # fp32 CPU vs the official implementation's final latents (fixture README)
SUBJECTS = ["a red cat on a blue chair", "a lighthouse at dusk", "a bowl of ramen", "a snowy mountain village",
            "an astronaut riding a horse", "a watercolor of a fox", "a vintage car in the rain",
            "a bonsai tree on a desk"]
NEGATIVE = ""


def prompts_for(batch: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, photo {i}" for i in range(batch)]


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        bu.reset_peak_rss()


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"kind": "peak_rss", "bytes": bu.peak_rss_bytes()}


def resting_memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else bu.rss_bytes()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- speed -------------------------------------------------------------------------------------------
def run_generation(pipe, batch: int, size: int, steps: int, guidance: float, seed: int, device,
                   acceleration: dict | None = None) -> dict:
    """encode -> sample -> decode as ``pipe.generate`` does, each part timed (device synchronised).

    ``acceleration``: opt-in acceleration settings of ``SamplingParams`` (none: the exact path).
    """
    from tbac_core.params import SamplingParams

    encode, sample, decode = [], [], []
    stamps: list[float] = []

    def on_step(info):
        bu.synchronize(device)
        stamps.append(time.perf_counter())

    prompts = prompts_for(batch)
    peak_memory_reset(device)
    with bu.timed(encode, device):
        cond = pipe.encode(prompts, negative_prompt=NEGATIVE)
    peak_encode = peak_memory(device)
    # Sampling + decode peak on its own: with offload-mllm the MLLM has left the device by now.
    peak_memory_reset(device)
    params = SamplingParams(steps=steps, guidance_scale=guidance, seed=seed, **(acceleration or {}))
    with bu.timed(sample, device):
        latents = pipe.sample(cond, width=size, height=size, params=params, callback=on_step)
    with bu.timed(decode, device):
        images = pipe.decode(latents)
    peak_sampling = peak_memory(device)
    if not torch.isfinite(images).all():
        raise RuntimeError(f"non-finite images at batch {batch}: the benchmark would time garbage")
    return {"encode": encode[0], "sample": sample[0], "decode": decode[0],
            "steps": [b - a for a, b in itertools.pairwise(stamps)], "images": images.shape[0],
            "first_image": images[0].float().cpu(), "peak_encode": peak_encode, "peak_sampling": peak_sampling}


def bench_mode(model, mode: str, device, batches: list[int], size: int, steps: int, guidance: float,
               repeats: int, warmup_steps: int) -> dict:
    from tbac_core import TBACPipeline

    pipe = TBACPipeline(model, memory=mode, device=device, cache_size=0)
    release(device)
    rest = resting_memory(device)
    if warmup_steps > 0:  # first-call costs (kernel selection, allocator growth, lazy inits) are not timed
        run_generation(pipe, 1, size, warmup_steps, guidance, 0, device)
    results = {"memory_at_rest_bytes": rest, "batches": {}}
    for batch in batches:
        runs = [run_generation(pipe, batch, size, steps, guidance, repeat, device) for repeat in range(repeats)]
        peak_encode = max((r["peak_encode"] for r in runs), key=lambda p: p["bytes"])
        peak_sampling = max((r["peak_sampling"] for r in runs), key=lambda p: p["bytes"])
        totals = [r["encode"] + r["sample"] + r["decode"] for r in runs]
        results["batches"][str(batch)] = {
            "seconds_per_image": bu.summary([t / batch for t in totals]),
            "generation_seconds": bu.summary(totals),
            "encode_seconds": bu.summary([r["encode"] for r in runs]),
            "sample_seconds": bu.summary([r["sample"] for r in runs]),
            "step_seconds": bu.summary([s for r in runs for s in r["steps"]]),
            "decode_seconds": bu.summary([r["decode"] for r in runs]),
            "peak_memory": max(peak_encode, peak_sampling, key=lambda p: p["bytes"]),
            "peak_memory_encode": peak_encode,
            "peak_memory_sampling_decode": peak_sampling,
        }
        release(device)
    # What the pipeline keeps on the device between runs (its guidance and image caches wait in host
    # memory, devices.to_host): ~0 on a GPU. On the CPU (--smoke) this is RSS growth, allocator noise.
    results["memory_kept_after_runs_bytes"] = resting_memory(device) - rest
    del pipe
    return results


def bench_accelerated(model, device, size: int, steps: int, guidance: float, repeats: int, warmup_steps: int,
                      configs: list[dict]) -> dict:
    """Batch 1 in memory mode ``full``: the exact path, then each acceleration set on the same seeds.

    Per set: seconds per image (median), its speed-up over the exact path, and the PSNR of each
    image against the exact image of the same seed (the acceleration's image cost).
    """
    from tbac_core import TBACPipeline

    pipe = TBACPipeline(model, memory="full", device=device, cache_size=0)
    if warmup_steps > 0:
        run_generation(pipe, 1, size, warmup_steps, guidance, 0, device)
    exact = [run_generation(pipe, 1, size, steps, guidance, seed, device) for seed in range(repeats)]
    exact_seconds = statistics.median(r["encode"] + r["sample"] + r["decode"] for r in exact)
    rows = {"exact": {"settings": {}, "seconds_per_image": exact_seconds, "speedup": 1.0}}
    for config in configs:
        runs = [run_generation(pipe, 1, size, steps, guidance, seed, device, config) for seed in range(repeats)]
        seconds = statistics.median(r["encode"] + r["sample"] + r["decode"] for r in runs)
        rows[acceleration_label(config)] = {
            "settings": config, "seconds_per_image": seconds, "speedup": exact_seconds / seconds,
            "step_seconds": bu.summary([s for r in runs for s in r["steps"]]),
            "psnr_db_vs_exact": [bu.psnr(r["first_image"], e["first_image"]) for r, e in zip(runs, exact)],
        }
    del pipe
    release(device)
    return rows


# -- parity ------------------------------------------------------------------------------------------
def parity(fixtures: Path, device, dtypes: list[str]) -> dict:
    """Golden t2i case: fp32 CPU (reference) vs each dtype on ``device``; plus fp32 CPU vs the goldens."""
    from safetensors.torch import load_file

    from tbac_core import TBACPipeline

    checkpoint = fixtures / "tbac-tiny" / "checkpoint"
    golden = load_file(str(fixtures / "tbac-tiny" / "goldens" / "t2i.safetensors"))["final_latents"]
    case = dict(GOLDEN_CASE)
    prompts = case.pop("prompts")

    def run(target_device, dtype):
        pipe = TBACPipeline.from_pretrained(checkpoint, device=target_device, dtype=dtype, cache_size=0)
        output = pipe.generate(prompts, **case)
        return output.latents.float().cpu(), output.tensors.float().cpu()

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_latents, ref_images = run("cpu", "fp32")
        report = {
            "case": "t2i (shared/fixtures/tbac-tiny/goldens)", "reference": "fp32 on cpu",
            "reference_vs_golden_latents_max_abs": (ref_latents - golden).abs().max().item(),
            "golden_tolerance": GOLDEN_TOLERANCE, "compared": {},
        }
        for dtype in dtypes:
            latents, images = run(device, dtype)
            diff = {"latents_max_abs": (latents - ref_latents).abs().max().item(),
                    "images_max_abs": (images - ref_images).abs().max().item(),
                    "images_mean_abs": (images - ref_images).abs().mean().item(),
                    "tolerance": TOLERANCE[dtype]}
            diff["within_tolerance"] = (diff["latents_max_abs"] <= TOLERANCE[dtype]["latents"]
                                        and diff["images_max_abs"] <= TOLERANCE[dtype]["images"]
                                        and diff["images_mean_abs"] <= TOLERANCE[dtype]["images_mean"])
            report["compared"][f"{dtype} on {torch.device(device).type}"] = diff
        report["golden_ok"] = report["reference_vs_golden_latents_max_abs"] <= GOLDEN_TOLERANCE
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return report


def time_load(checkpoint: Path, device, dtype: str) -> dict:
    from tbac_core.loading import load_model

    release(device)
    peak_memory_reset(device)
    bu.reset_peak_rss()
    rss_before = bu.rss_bytes()
    start = time.perf_counter()
    model = load_model(checkpoint, device=device, dtype=dtype)
    bu.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"checkpoint": str(checkpoint), "seconds": seconds, "weights_bytes":
              bu.tensor_bytes(model.mllm, model.dit, model.vae), "rss_before": rss_before,
              "peak_rss": bu.peak_rss_bytes(), "peak_device_memory": peak_memory(device)}
    del model
    release(device)
    return result


# -- report ------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    rows = []
    runs = [(mode, data) for mode, data in result["speed"].items()]
    runs += [(f"full, {fmt} weights", data) for fmt, data in result.get("quantized", {}).items()]
    for mode, data in runs:
        for batch, stats in data["batches"].items():
            rows.append([
                mode, batch,
                f"{stats['seconds_per_image']['median']:.3f}",
                f"{stats['encode_seconds']['median']:.3f}",
                f"{stats['step_seconds']['median'] * 1000:.1f}",
                f"{stats['decode_seconds']['median']:.3f}",
                bu.gib(stats["peak_memory_encode"]["bytes"]),
                bu.gib(stats["peak_memory_sampling_decode"]["bytes"]),
                bu.gib(data["memory_at_rest_bytes"]),
                bu.gib(data["memory_kept_after_runs_bytes"]),
            ])
    s = result["settings"]
    memory = "VRAM" if result["device"].startswith("cuda") else "RSS"
    lines = [(f"{s['size']}x{s['size']}, {s['steps']} steps, guidance {s['guidance_scale']}, {s['dtype']}, "
             f"medians of {s['repeats']} runs"),
             bu.markdown_table(["memory mode", "batch", "s/image", "encode s", "step ms", "decode s",
                                f"peak {memory} encode", f"peak {memory} sample+decode", f"{memory} at rest",
                                f"{memory} kept after the runs"], rows)]
    if result.get("accelerated"):
        arow = [[name, f"{row['seconds_per_image']:.3f}", f"{row['speedup']:.2f}x",
                 "-" if name == "exact" else f"{min(row['psnr_db_vs_exact']):.1f}"]
                for name, row in result["accelerated"].items()]
        lines += ["", "opt-in accelerations, memory mode full, batch 1:",
                  bu.markdown_table(["setting", "s/image", "speed-up", "PSNR vs exact (min, dB)"], arow)]
    if result.get("parity"):
        p = result["parity"]
        lines += ["", (f"parity ({p['case']}), reference {p['reference']}: vs golden latents max abs "
                      f"{p['reference_vs_golden_latents_max_abs']:.2e} (tolerance {p['golden_tolerance']:.0e})")]
        prow = [[name, f"{d['latents_max_abs']:.3e}", f"{d['images_max_abs']:.3e}", f"{d['images_mean_abs']:.2e}",
                 f"{d['tolerance']['latents']:g} / {d['tolerance']['images']:g} / {d['tolerance']['images_mean']:g}",
                 "yes" if d["within_tolerance"] else "NO"] for name, d in p["compared"].items()]
        lines.append(bu.markdown_table(["run", "latents max abs", "images max abs", "images mean abs",
                                        "tolerance (lat / img / img mean)", "within"], prow))
    if result.get("load"):
        load = result["load"]
        lines += ["", (f"load {load['checkpoint']}: {load['seconds']:.2f} s, weights {bu.gib(load['weights_bytes'])}, "
                      f"peak RSS {bu.gib(load['peak_rss'])}, peak device memory "
                      f"{bu.gib(load['peak_device_memory']['bytes'])}")]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny architecture on the CPU, a few seconds (CI)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument("--size", default=None, choices=mrc.SPEC_NAMES, help="architecture (default real; tiny with --smoke)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--batches", default=None, help="comma list (default 1,4,16; 1,2 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (2 with --smoke)")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image side in pixels (default: the architecture's trained size)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed warm-up generation per mode (0: none)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per batch (default 2; 1 with --smoke)")
    parser.add_argument("--modes", default="full,offload-mllm")
    parser.add_argument("--weights", default="fp8,q8_0",
                        help="quantised weight formats also run in full mode (comma list; '' for none)")
    parser.add_argument("--accelerated", default="cache_threshold=0.1;cache_threshold=0.2",
                        help="opt-in acceleration sets timed at batch 1 against the exact path, ';' between sets, "
                             "each key=value[,key=value] ('' for none)")
    parser.add_argument("--compile", action="store_true", help="also pass compile_dit (torch.compile of DiT blocks)")
    parser.add_argument("--fixtures", type=Path, default=mrc.DEFAULT_FIXTURES)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--load-checkpoint", type=Path, default=None, help="also time loading this checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file, or a folder for the default name")
    args = parser.parse_args(argv)

    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --smoke (CPU) or --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    size_name = args.size or ("tiny" if smoke else "real")
    batches = [int(b) for b in (args.batches or ("1,2" if smoke else "1,4,16")).split(",")]
    steps = args.steps or (2 if smoke else 30)
    repeats = args.repeats or (1 if smoke else 2)
    modes = [m for m in args.modes.split(",") if m]
    from tbac_core.params import QUANTIZATION_FORMATS

    try:
        accelerated = parse_accelerated(args.accelerated)
    except ValueError as exc:
        parser.error(f"--accelerated: {exc}")
    weight_formats = [w for w in args.weights.split(",") if w]
    if set(weight_formats) - set(QUANTIZATION_FORMATS):
        parser.error(f"--weights: choose from {', '.join(QUANTIZATION_FORMATS)}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    started = time.perf_counter()

    spec = mrc.make_spec(size_name, args.fixtures)
    image_size = args.image_size or spec.image_size
    build = []
    with bu.timed(build, device):
        model = mrc.build_random_model(spec, device=device, dtype=dtype, fixtures=args.fixtures)
    if args.compile:
        from tbac_core import TBACPipeline

        TBACPipeline(model, memory="full", device=device, compile_dit=True)  # compiles the blocks in place
    weights = bu.tensor_bytes(model.mllm, model.dit, model.vae)
    result = {
        "date": datetime.date.today().isoformat(),
        "smoke": smoke,
        "device": str(device),
        "machine": bu.machine_facts(),
        "model": {"architecture": size_name, "parameters": mrc.parameter_counts(spec), "weights_bytes": weights,
                  "dtype": args.dtype, "build_seconds": build[0], "mllm_bytes": bu.tensor_bytes(model.mllm),
                  "dit_bytes": bu.tensor_bytes(model.dit), "vae_bytes": bu.tensor_bytes(model.vae)},
        "settings": {"size": image_size, "steps": steps, "guidance_scale": args.guidance, "sampler": "dpm++",
                     "dtype": args.dtype, "batches": batches, "repeats": repeats, "modes": modes,
                     "compile_dit": args.compile, "quantized_weights": weight_formats, "accelerated": accelerated,
                     "prompts": "distinct prompts, one image each",
                     "mllm_tokens_per_row": _tokens_per_row(model)},
        "speed": {},
    }
    for mode in modes:
        result["speed"][mode] = bench_mode(model, mode, device, batches, image_size, steps, args.guidance,
                                           repeats, args.warmup_steps)
    if accelerated:
        result["accelerated"] = bench_accelerated(model, device, image_size, steps, args.guidance, repeats,
                                                  args.warmup_steps, accelerated)
    del model
    release(device)
    result["quantized"] = {}
    for fmt in weight_formats:
        build = []
        with bu.timed(build, device):
            model = mrc.build_random_model(spec, device=device, dtype=dtype, fixtures=args.fixtures, quantization=fmt)
        stats = bench_mode(model, "full", device, batches, image_size, steps, args.guidance, repeats,
                           args.warmup_steps)
        stats.update(weights_bytes=bu.tensor_bytes(model.mllm, model.dit, model.vae), build_seconds=build[0],
                     quantized_layers=sum(type(m).__name__ in ("FP8Linear", "GGUFLinear")
                                          for m in [*model.mllm.modules(), *model.dit.modules()]))
        result["quantized"][fmt] = stats
        del model
        release(device)
    if args.load_checkpoint:
        result["load"] = time_load(args.load_checkpoint, device, args.dtype)
    if not args.skip_parity:
        result["parity"] = parity(args.fixtures, device, [args.dtype] + (["fp32"] if args.dtype != "fp32" else []))
    result["total_seconds"] = time.perf_counter() - started
    result["table"] = table(result)

    name = "smoke-cpu" if smoke else f"gpu-{slug(result['machine'].get('gpu') or device.type)}"
    out = args.out or BENCH / "results" / f"{name}-{result['date']}.json"
    if out.is_dir():
        out = out / f"{name}-{result['date']}.json"
    print(result["table"])
    print(f"\ntotal {result['total_seconds']:.1f} s; written: {bu.write_json(out, result)}")
    parity_ok = all(d["within_tolerance"] for d in result.get("parity", {}).get("compared", {}).values())
    if result.get("parity") and not (parity_ok and result["parity"]["golden_ok"]):
        print("PARITY OUTSIDE TOLERANCE", file=sys.stderr)
        sys.exit(1)
    return result


def _tokens_per_row(model) -> int:
    from tbac_core.processing.prompt_layout import conditioning_rows

    rows = conditioning_rows(model.prompts, prompts_for(1), None, NEGATIVE)
    batch = model.prompts.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
    return int(batch["input_ids"].shape[1])


if __name__ == "__main__":
    main()
