"""Scoring the demo model's three jobs on combinations it never saw in any training job.

``python -m tbac_core.demo.evaluate [--model DIR] [--layers SPEC] [--seeds 0 1 ...]`` prints one
JSON object with a score per job, all on the held-out scenes of the checkpoint's ``split.json``:

* ``understand``: every held-out scene asked each ``questions.IMAGE_QUESTIONS`` question (the
  presets "describe in detail" and "short caption" must give the exact caption, the attribute
  questions the exact word), greedy decoding with the library's defaults;
* ``generate``: every held-out caption drawn, the background and shape colours checked with the
  pixel measure of ``scenes.measure_scene`` (``fraction``); the shape's form by the rougher
  fill-ratio measure (``shape_fraction``);
* ``edit``: for every held-out scene, a training scene one colour away edited into it ("make the
  circle green", "change the background to black"): ``applied`` = the named colour is now right,
  ``kept`` = the other colour is unchanged (``shape_kept``: the form, rough measure).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import DEMO_CHECKPOINT, demo_defaults
from .questions import IMAGE_QUESTIONS, answer_for
from .scenes import (
    Scene,
    edit_instruction,
    held_out_edits,
    load_split,
    measure_scene,
    measure_shape,
    render_scene,
)

BATCH = 32  # prompts per generate call (the pipeline takes at most 64 images)
ANSWER_TOKENS = 24  # the longest demo answer is 8 tokens


@dataclass
class Score:
    rows: list[dict] = field(default_factory=list)  # one per prompt/question, each with boolean fields

    @property
    def total(self) -> int:
        return len(self.rows)

    def share(self, key: str) -> float:
        return sum(bool(row[key]) for row in self.rows) / self.total if self.total else 0.0

    @property
    def matched(self) -> int:
        return sum(bool(row["ok"]) for row in self.rows)

    @property
    def fraction(self) -> float:
        return self.share("ok")

    @property
    def shape_fraction(self) -> float:
        return self.share("shape_ok")

    def summary(self, keys: tuple[str, ...] = ("ok",)) -> dict:
        out = {"total": self.total}
        for key in keys:
            out["fraction" if key == "ok" else key] = round(self.share(key), 4)
        if "ok" in keys:
            out["matched"] = self.matched
        return out


def _settings(pipe, checkpoint_dir, layers, steps, guidance_scale) -> dict:
    defaults = demo_defaults(checkpoint_dir or pipe.model.checkpoint_dir)
    return {"steps": steps or defaults["steps"],
            "guidance_scale": guidance_scale if guidance_scale is not None else defaults["guidance_scale"],
            "sampler": defaults["sampler"], "layers": layers or defaults.get("layers", "default")}


def score_scenes(pipe, scenes: list[Scene], *, seeds=(0,), layers: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, checkpoint_dir=None) -> Score:
    """Text-to-image: each scene's caption once per seed (batches of ``BATCH``), colours measured."""
    settings = _settings(pipe, checkpoint_dir, layers, steps, guidance_scale)
    score = Score()
    for seed in seeds:
        for start in range(0, len(scenes), BATCH):
            chunk = scenes[start: start + BATCH]
            output = pipe.generate([scene.caption() for scene in chunk], seed=seed + start, **settings)
            for scene, image in zip(chunk, output.images):
                background, shape = measure_scene(image)
                form = measure_shape(image, scene.colour)
                score.rows.append({"prompt": scene.caption(), "seed": seed + start, "background": background,
                                   "shape_colour": shape, "shape": form,
                                   "ok": (background, shape) == (scene.background, scene.colour),
                                   "shape_ok": form == scene.shape})
    return score


def score_edits(pipe, pairs: list[tuple[Scene, Scene]], *, seeds=(0,), layers: str | None = None,
                steps: int | None = None, guidance_scale: float | None = None, checkpoint_dir=None,
                image_size: int = 32) -> Score:
    """Edits: each (source, target) pair's instruction applied to the rendered source, once per seed."""
    settings = _settings(pipe, checkpoint_dir, layers, steps, guidance_scale)
    score = Score()
    for seed in seeds:
        for start in range(0, len(pairs), BATCH):
            chunk = pairs[start: start + BATCH]
            output = pipe.edit([edit_instruction(s, t) for s, t in chunk],
                               [[render_scene(s, image_size)] for s, _ in chunk], seed=seed + start, **settings)
            for (source, target), image in zip(chunk, output.images):
                background, colour = measure_scene(image)
                if source.colour != target.colour:
                    applied, kept = colour == target.colour, background == source.background
                else:
                    applied, kept = background == target.background, colour == source.colour
                score.rows.append({"instruction": edit_instruction(source, target), "source": source.caption(),
                                   "seed": seed + start, "background": background, "shape_colour": colour,
                                   "applied": applied, "kept": kept,
                                   "shape_kept": measure_shape(image, target.colour) == source.shape})
    return score


def score_understanding(pipe, scenes: list[Scene], *, questions=IMAGE_QUESTIONS, image_size: int = 32) -> Score:
    """Each question about each scene's centred rendering; ``ok`` = the exact expected answer."""
    from ..params import GenerationSettings
    from ..pipeline.understanding import answer_batch

    asked = [(scene, question) for scene in scenes for question in questions]
    answers = answer_batch(pipe, [q for _, q in asked], [[render_scene(s, image_size)] for s, _ in asked],
                           settings=GenerationSettings(max_new_tokens=ANSWER_TOKENS))
    score = Score()
    for (scene, question), answer in zip(asked, answers):
        expected = answer_for(question, scene)
        score.rows.append({"scene": scene.caption(), "question": question, "answer": answer,
                           "expected": expected, "ok": answer == expected})
    return score


def load_demo_pipe(checkpoint_dir=DEMO_CHECKPOINT):
    from ..pipeline.tbac_pipeline import TBACPipeline

    return TBACPipeline.from_pretrained(Path(checkpoint_dir), device="cpu", dtype="fp32")


def score_held_out(checkpoint_dir=DEMO_CHECKPOINT, *, pipe=None, seeds=(0,), layers: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None) -> Score:
    """Text-to-image on the held-out captions."""
    checkpoint_dir = Path(checkpoint_dir)
    _, held_out = load_split(checkpoint_dir / "split.json")
    return score_scenes(pipe or load_demo_pipe(checkpoint_dir), held_out, seeds=seeds, layers=layers, steps=steps,
                        guidance_scale=guidance_scale, checkpoint_dir=checkpoint_dir)


def held_out_edit_pairs(checkpoint_dir=DEMO_CHECKPOINT) -> list[tuple[Scene, Scene]]:
    train, held_out = load_split(Path(checkpoint_dir) / "split.json")
    return held_out_edits(train, held_out, seed=0)


def evaluate_all(checkpoint_dir=DEMO_CHECKPOINT, *, pipe=None, seeds=(0,), layers: str | None = None,
                 jobs=("understand", "generate", "edit"), verbose=None) -> dict:
    """Summaries of the three held-out scores (``verbose``: called with every row)."""
    checkpoint_dir = Path(checkpoint_dir)
    pipe = pipe or load_demo_pipe(checkpoint_dir)
    _, held_out = load_split(checkpoint_dir / "split.json")
    result = {}
    scores = {}
    if "understand" in jobs:
        scores["understand"] = score_understanding(pipe, held_out)
        result["understand"] = scores["understand"].summary()
    if "generate" in jobs:
        scores["generate"] = score_scenes(pipe, held_out, seeds=seeds, layers=layers, checkpoint_dir=checkpoint_dir)
        result["generate"] = scores["generate"].summary(("ok", "shape_ok"))
        result["generate"]["shape_fraction"] = result["generate"].pop("shape_ok")
    if "edit" in jobs:
        scores["edit"] = score_edits(pipe, held_out_edit_pairs(checkpoint_dir),
                                     seeds=seeds, layers=layers, checkpoint_dir=checkpoint_dir)
        result["edit"] = scores["edit"].summary(("applied", "kept", "shape_kept"))
    if verbose is not None:
        for job, score in scores.items():
            for row in score.rows:
                verbose({"job": job, **row})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbac_core.demo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--layers", default=None, help="Layer spec (default: the one stored with the model).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", nargs="+", default=["understand", "generate", "edit"],
                        choices=["understand", "generate", "edit"])
    parser.add_argument("--verbose", action="store_true", help="Print every prompt's measurement (stderr).")
    args = parser.parse_args(argv)
    verbose = (lambda row: print(json.dumps(row), file=sys.stderr)) if args.verbose else None
    print(json.dumps(evaluate_all(args.model, seeds=tuple(args.seeds), layers=args.layers, jobs=tuple(args.jobs),
                                  verbose=verbose)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
