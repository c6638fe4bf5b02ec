"""The ladder ablation on the demo: which MLLM rungs should the DiT blocks read?

``python -m tbac_core.demo.ablation [--steps 600] [--seeds 0 1] [--layers default final 3-4]``

Starts from the built demo checkpoint's PRETRAINED, frozen Qwen2.5-VL (its base vocabulary rows,
vision tower and decoder) and VAE, and for each layer spec and seed trains fresh metaquery rows,
connector and DiT (seeded by the run's seed) on the same caption pairs and edit triples with the
same budget, then scores text-to-image and edits on the held-out combinations
(``evaluate.score_scenes`` / ``score_edits``). Prints one JSON line per run and a summary table.

Layer specs (``ladder.layer_spec``; the demo MLLM has 7 rungs, the DiT 4 blocks): ``default`` =
the ladder, blocks read rungs 2, 3, 4, 5; ``final`` = every block reads the final-norm output;
``3-4`` = a few middle layers (blocks read 3, 3, 4, 4).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import DEMO_CHECKPOINT, DEMO_NAME
from .build import load_pretrained_parts, render_training_data, train_ladder
from .components import EMBED_KEY, DemoSpec
from .evaluate import held_out_edit_pairs, score_edits, score_scenes
from .scenes import load_split


def pretrained_parts(checkpoint_dir: Path) -> tuple[dict, dict, DemoSpec]:
    """(frozen MLLM weights without the metaquery rows, VAE weights, spec) of a built demo."""
    from ..loading.build import load_model

    model = load_model(checkpoint_dir, dtype="fp32", device="cpu", name=DEMO_NAME)
    info = json.loads((checkpoint_dir / "demo_info.json").read_text(encoding="utf-8"))
    spec = DemoSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["spec"].items()})
    mllm = {k: v.clone() for k, v in model.mllm.state_dict().items() if not k.startswith("lm_head")}
    mllm[EMBED_KEY] = mllm[EMBED_KEY][: model.base_vocab].clone()
    return mllm, {k: v.clone() for k, v in model.vae.state_dict().items()}, spec


def run_ablation(checkpoint_dir: Path, work: Path, *, layer_specs: list[str], seeds: list[int], steps: int,
                 batch_size: int, learning_rate: float, images_per_scene: int, eval_seeds=(0,),
                 pretrained: Path | None = None, log=print) -> list[dict]:
    """``pretrained``: a build's ``work/pretrained.safetensors`` (then ``checkpoint_dir`` may be the
    build's unfinished output folder: only its component folders and split are read)."""
    from ..pipeline.tbac_pipeline import TBACPipeline

    if pretrained is not None:
        mllm, vae_state = load_pretrained_parts(pretrained)
        spec = DemoSpec()
    else:
        mllm, vae_state, spec = pretrained_parts(checkpoint_dir)
    train, held_out = load_split(checkpoint_dir / "split.json")
    data_dirs = render_training_data(work, train, spec, images_per_scene)
    pairs = held_out_edit_pairs(checkpoint_dir)
    runs = []
    for layers in layer_specs:
        for seed in seeds:
            tick = time.process_time()
            model, result = train_ladder(checkpoint_dir, work / f"{layers}-{seed}", data_dirs, mllm, vae_state,
                                         spec=spec, seed=seed, steps=steps, batch_size=batch_size,
                                         learning_rate=learning_rate, layers=layers, log=log)
            pipe = TBACPipeline(model)
            t2i = score_scenes(pipe, held_out, seeds=eval_seeds, layers=layers, checkpoint_dir=checkpoint_dir)
            edits = score_edits(pipe, pairs, seeds=eval_seeds, layers=layers, checkpoint_dir=checkpoint_dir)
            run = {"layers": layers, "seed": seed, "steps": steps, "colour": t2i.fraction, "shape": t2i.shape_fraction,
                   "edit_applied": edits.share("applied"), "edit_kept": edits.share("kept"),
                   "final_loss": sum(result.losses[-20:]) / len(result.losses[-20:]),
                   "cpu_seconds": round(time.process_time() - tick, 1)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def summary_table(runs: list[dict]) -> str:
    keys = ("colour", "shape", "edit_applied", "edit_kept")
    lines = ["| layers | seeds | t2i colour | t2i shape | edit applied | edit kept |", "|---|---|---|---|---|---|"]
    for layers in dict.fromkeys(r["layers"] for r in runs):
        mine = [r for r in runs if r["layers"] == layers]
        cells = []
        for key in keys:
            values = [100 * r[key] for r in mine]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread} %")
        lines.append(f"| {layers} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbac_core.demo.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_CHECKPOINT, help="A built demo checkpoint.")
    parser.add_argument("--layers", nargs="+", default=["default", "final", "3-4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images-per-scene", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="A build's work/pretrained.safetensors (default: read the parts from --model).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = (lambda message: print(message, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="tbac-ablation-") as work:
        runs = run_ablation(args.model, Path(work), layer_specs=args.layers, seeds=args.seeds, steps=args.steps,
                            batch_size=args.batch_size, learning_rate=args.lr,
                            images_per_scene=args.images_per_scene, pretrained=args.pretrained, log=log)
    print(summary_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
