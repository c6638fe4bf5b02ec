#!/usr/bin/env python3
"""Speed of the denoising loop: the exact path against each opt-in acceleration, with its image cost.

For every configuration (exact; First-Block-Cache at each ``--thresholds`` and ``--max-skips``;
guidance truncation at each ``--cutoffs``; both together) it prints the median seconds of a generation (sampling + VAE
decode, the conditioning encoded once beforehand) as wall time and as the process's CPU time (with
one torch thread the CPU time ignores waits for a core, so it is the stable figure on a shared
machine), the speed-up over exact (CPU time), the fraction of DiT
blocks that ran, and the PSNR of the images against the exact run at the same seed. On the demo
model (``--model demo``) it also prints the held-out prompt-colour score of each configuration
(``tbac_core.demo.evaluate``'s measure), which must not drop.

With ``--throughput N`` it also times N prompts rendered one by one against their denoising as
one batch (the batch command's ``--throughput``), with the PSNR of the batched images.

Usage: python bench/speed_bench.py [--model demo|medium|DIR] [--steps 20] [--repeats 3] [--threads 1]
       [--throughput 4]
Results: a table on stdout and ``bench/results/speed-cpu-<date>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
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



def configurations(thresholds: list[float], cutoffs: list[float], max_skips: list[int]) -> list[tuple[str, dict]]:
    configs = [("exact", {})]
    configs += [(f"cache {t:g}, max skips {m}", {"cache_threshold": t, "cache_max_skips": m})
                for m in max_skips for t in thresholds]
    configs += [(f"cutoff {c:g}", {"guidance_cutoff": c}) for c in cutoffs]
    if thresholds and cutoffs:
        configs.append((f"cache {thresholds[-1]:g}, max skips {max_skips[0]} + cutoff {cutoffs[0]:g}",
                        {"cache_threshold": thresholds[-1], "cache_max_skips": max_skips[0],
                         "guidance_cutoff": cutoffs[0]}))
    return configs


class BlockCounter:
    """Counts DiT block calls through forward pre-hooks (to report the fraction of blocks run)."""

    def __init__(self, blocks):
        self.calls = 0
        self.handles = [block.register_forward_pre_hook(self._count) for block in blocks]

    def _count(self, _module, _args):
        self.calls += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


def measure(pipe, cond, sampling, width, height, repeats: int) -> dict:
    """Median seconds of sample + decode, the images of the last run, and DiT blocks per step."""
    from tbac_core.params import SamplingParams

    params = SamplingParams(**sampling)
    params.validate()
    blocks = pipe.model.dit.transformer.transformer_blocks
    seconds, cpu_seconds, images, counter = [], [], None, BlockCounter(blocks)
    try:
        for _ in range(repeats):
            counter.calls = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            latents = pipe.sample(cond, width=width, height=height, params=params)
            images = pipe.decode(latents)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    finally:
        counter.close()
    return {"seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu_seconds),
            "all_cpu_seconds": cpu_seconds, "images": images,
            "blocks_run_fraction": counter.calls / (params.steps * len(blocks))}


THROUGHPUT_PROMPTS = ("a red cat on a blue chair", "a small green house by the river", "a yellow car in the snow",
                      "a purple flower in a white vase", "an orange boat on a grey sea", "a black dog on green grass",
                      "a pink cake on a wooden table", "a brown horse under a blue sky")


def measure_throughput(pipe, sampling: dict, width: int, height: int, count: int) -> dict:
    """``count`` prompts (own seeds) one by one against denoised as one batch (the batch command's
    ``--throughput``): CPU seconds of sampling + decode per image, and the PSNR of the batched images."""
    from tbac_core.params import SamplingParams

    prompts = [THROUGHPUT_PROMPTS[i % len(THROUGHPUT_PROMPTS)] for i in range(count)]
    seeds = list(range(count))
    params = SamplingParams(**{**sampling, "seed": 0})
    conds = [pipe.encode(prompt) for prompt in prompts]
    together_cond = pipe.encode(prompts)
    start = time.process_time()
    alone = torch.cat([pipe.decode(pipe.sample(cond, width=width, height=height,
                                               params=SamplingParams(**{**sampling, "seed": seed})))
                       for cond, seed in zip(conds, seeds)])
    alone_seconds = time.process_time() - start
    start = time.process_time()
    latents = pipe.sample(together_cond, width=width, height=height, params=params, prompt_seeds=seeds,
                          check_memory=True)
    together = torch.cat([pipe.decode(latents[i:i + 1]) for i in range(count)])
    together_seconds = time.process_time() - start
    return {"prompts": count, "alone_cpu_seconds": round(alone_seconds, 3),
            "together_cpu_seconds": round(together_seconds, 3),
            "speedup": round(alone_seconds / together_seconds, 3), "psnr_db": round(bu.psnr(together, alone), 2)}


def demo_score(pipe, sampling: dict) -> dict:
    """Held-out prompt-colour score of the demo model under one configuration (evaluate's measure)."""
    from tbac_core.demo import demo_defaults
    from tbac_core.demo.scenes import load_split, measure_scene
    from tbac_core.params import SamplingParams

    defaults = demo_defaults(pipe.model.checkpoint_dir)
    _, held_out = load_split(Path(pipe.model.checkpoint_dir) / "split.json")
    cond = pipe.encode([scene.caption() for scene in held_out])
    params = SamplingParams(**{**sampling, "seed": 0})
    images = pipe.decode(pipe.sample(cond, width=defaults["width"], height=defaults["height"], params=params))
    matched = sum(measure_scene(image.numpy()) == (scene.background, scene.colour)
                  for scene, image in zip(held_out, images))
    return {"matched": matched, "total": len(held_out), "images": images}


def resolve_model(name: str) -> Path:
    if name == "demo":
        from tbac_core.demo import DEMO_CHECKPOINT

        return DEMO_CHECKPOINT
    if name in ("tiny", "medium"):
        import make_random_checkpoint as mrc

        checkpoint = BENCH / "models" / name / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            mrc.write_checkpoint(mrc.make_spec(name), BENCH / "models")
        return checkpoint
    return Path(name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, tiny, medium, or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's stored steps, else 20")
    parser.add_argument("--guidance", type=float, default=None, help="default: the demo's stored guidance, else SamplingParams'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--thresholds", default="0.05,0.1,0.2", help="First-Block-Cache thresholds")
    parser.add_argument("--cutoffs", default="0.7,0.5", help="guidance truncation fractions")
    parser.add_argument("--max-skips", default=None,
                        help="First-Block-Cache's most skipped steps in a row, each with every threshold "
                             "(default: SamplingParams' default)")
    parser.add_argument("--throughput", type=int, default=0,
                        help="also time this many prompts one by one against one batch (0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tbac_core import TBACPipeline
    from tbac_core.demo import demo_defaults
    from tbac_core.params import SamplingParams

    checkpoint = resolve_model(args.model)
    pipe = TBACPipeline.from_pretrained(checkpoint, device="cpu", dtype="fp32")
    is_demo = args.model == "demo"
    defaults = demo_defaults(checkpoint) if is_demo else {}
    steps = args.steps or defaults.get("steps", 20)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance_scale", SamplingParams.guidance_scale)
    width, height = pipe.resolve_size(defaults.get("width"), defaults.get("height"))
    cond = pipe.encode(PROMPT)
    base = {"steps": steps, "guidance_scale": guidance, "sampler": defaults.get("sampler", "dpm++"), "seed": 0}

    rows, exact, exact_score_images = [], None, None
    thresholds = [float(v) for v in args.thresholds.split(",") if v]
    cutoffs = [float(v) for v in args.cutoffs.split(",") if v]
    max_skips = [int(v) for v in (args.max_skips or str(SamplingParams.cache_max_skips)).split(",") if v]
    for name, extra in configurations(thresholds, cutoffs, max_skips):
        sampling = {**base, **extra}
        result = measure(pipe, cond, sampling, width, height, args.repeats)
        if exact is None:
            exact = result
        row = {"config": name, "params": extra, "seconds": round(result["seconds"], 4),
               "cpu_seconds": round(result["cpu_seconds"], 4),
               "all_cpu_seconds": [round(s, 4) for s in result["all_cpu_seconds"]],
               "speedup": round(exact["cpu_seconds"] / result["cpu_seconds"], 3),
               "blocks_run_fraction": round(result["blocks_run_fraction"], 3),
               "psnr_db": round(bu.psnr(result["images"], exact["images"]), 2)}
        if is_demo:
            score = demo_score(pipe, sampling)
            exact_score_images = exact_score_images if exact_score_images is not None else score["images"]
            row["demo_colour_score"] = f"{score['matched']}/{score['total']}"
            row["demo_psnr_db"] = round(bu.psnr(score["images"], exact_score_images), 2)
        rows.append(row)
        print(row, flush=True)

    throughput = None
    if args.throughput > 1:
        throughput = measure_throughput(pipe, base, width, height, args.throughput)
        print({"throughput": throughput}, flush=True)

    result = {"date": datetime.date.today().isoformat(), "machine": bu.machine_facts(), "threads": args.threads,
              "model": args.model, "size": [width, height], "steps": steps, "guidance_scale": guidance,
              "repeats": args.repeats, "rows": rows, "throughput": throughput}
    header = ["config", "wall s / generation", "CPU s / generation", "speed-up (CPU s)", "blocks run", "PSNR vs exact (dB)"]
    if is_demo:
        header += ["demo colour score", "demo PSNR (dB)"]
    print(bu.markdown_table(header, [[r["config"], r["seconds"], r["cpu_seconds"], f"{r['speedup']}x", r["blocks_run_fraction"],
                                      r["psnr_db"], *([r["demo_colour_score"], r["demo_psnr_db"]] if is_demo else [])]
                                     for r in rows]))
    out = args.out or BENCH / "results" / f"speed-cpu-{args.model if args.model in ('demo', 'tiny', 'medium') else 'model'}-{result['date']}.json"
    bu.write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
