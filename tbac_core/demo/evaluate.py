"""Scoring the demo model on prompts whose combination it never saw in training.

``python -m tbac_core.demo.evaluate [--model DIR] [--layers SPEC]`` generates every held-out
prompt of the checkpoint's ``split.json`` and checks the background and shape colours with the
pixel measure of ``scenes.measure_scene``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import DEMO_CHECKPOINT, demo_defaults
from .scenes import Scene, load_split, measure_scene, measure_shape

BATCH = 32  # prompts per generate call (the pipeline takes at most 64 images)


@dataclass
class Score:
    rows: list[dict] = field(default_factory=list)  # prompt, seed, measured background/shape, ok

    @property
    def matched(self) -> int:
        return sum(row["ok"] for row in self.rows)

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def fraction(self) -> float:
        return self.matched / self.total if self.total else 0.0

    @property
    def shape_fraction(self) -> float:
        return sum(row["shape_ok"] for row in self.rows) / self.total if self.total else 0.0

    def summary(self) -> dict:
        """``fraction``: background and shape colour right (the acceptance measure); ``shape_fraction``:
        the shape's form right too, by the rougher fill-ratio measure."""
        return {"matched": self.matched, "total": self.total, "fraction": round(self.fraction, 4),
                "shape_fraction": round(self.shape_fraction, 4)}


def score_scenes(pipe, scenes: list[Scene], *, seeds=(0,), layers: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, checkpoint_dir=None) -> Score:
    """Generate each scene's caption once per seed (batches of ``BATCH``) and measure the colours."""
    defaults = demo_defaults(checkpoint_dir or pipe.model.checkpoint_dir)
    score = Score()
    for seed in seeds:
        for start in range(0, len(scenes), BATCH):
            chunk = scenes[start: start + BATCH]
            output = pipe.generate(
                [scene.caption() for scene in chunk], steps=steps or defaults["steps"],
                guidance_scale=guidance_scale if guidance_scale is not None else defaults["guidance_scale"],
                sampler=defaults["sampler"], seed=seed + start, layers=layers or defaults.get("layers", "default"))
            for scene, image in zip(chunk, output.images):
                background, shape = measure_scene(image)
                form = measure_shape(image, scene.colour)
                score.rows.append({"prompt": scene.caption(), "seed": seed + start, "background": background,
                                   "shape_colour": shape, "shape": form,
                                   "ok": (background, shape) == (scene.background, scene.colour),
                                   "shape_ok": form == scene.shape})
    return score


def score_held_out(checkpoint_dir=DEMO_CHECKPOINT, *, pipe=None, seeds=(0,), layers: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None) -> Score:
    from ..pipeline.tbac_pipeline import TBACPipeline

    checkpoint_dir = Path(checkpoint_dir)
    _, held_out = load_split(checkpoint_dir / "split.json")
    pipe = pipe or TBACPipeline.from_pretrained(checkpoint_dir, device="cpu", dtype="fp32")
    return score_scenes(pipe, held_out, seeds=seeds, layers=layers, steps=steps, guidance_scale=guidance_scale,
                        checkpoint_dir=checkpoint_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbac_core.demo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--layers", default=None, help="Layer spec (default: the one stored with the model).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--verbose", action="store_true", help="Print every prompt's measurement.")
    args = parser.parse_args(argv)
    score = score_held_out(args.model, seeds=tuple(args.seeds), layers=args.layers, steps=args.steps,
                           guidance_scale=args.guidance)
    if args.verbose:
        for row in score.rows:
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps(score.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
