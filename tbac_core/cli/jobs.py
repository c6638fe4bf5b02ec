"""A job: one render's parameters, from flags or a batch row, and its checks.

One table (``FIELDS``) gives the flags of generate/edit/batch and the batch row keys; values are
converted by :func:`coerce` and checked by :func:`check_job` with the core's own checks
(``tbac_core.params``), so a default or a limit is written once. Everything here is checked from
the checkpoint's config.json alone, before the model loads; only the layer spec needs the loaded
model (its rung and block counts): :func:`check_layers`.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidParameterError, JobError, LayerSpecError, UsageError
from ..ladder import LAYER_SPEC_SYNTAX, parse_layer_spec
from ..params import (
    DEFAULT_IMAGE_SIZE,
    MAX_CACHE_SKIPS,
    MAX_CACHE_THRESHOLD,
    SAMPLERS,
    SIZE_STEP,
    SamplingParams,
    check_batch,
    check_size,
)
from .images import image_path_problem
from .options import demo_settings

DEFAULT_IMG2IMG_DENOISE = 0.6  # with an init image, denoise 1.0 would ignore it entirely
DEFAULT_LAYERS = "default"  # the layer-spec keyword of the paper's mapping
_SAMPLING = SamplingParams()  # the library's defaults, for models that store none
_DEMO = demo_settings() or {}  # plain JSON: what the default (demo) model runs with
# The opt-in approximate accelerations: recorded in an output only when on, so exact records stay as they were.
ACCELERATION_FIELDS = ("cache_threshold", "cache_max_skips", "guidance_cutoff")


def _model_default(key: str, fallback) -> str:
    demo = f" (demo: {_DEMO[key]})" if key in _DEMO else ""
    return f"default: the model's stored setting{demo}, else {fallback}"


@dataclass(frozen=True)
class Field:
    kind: type  # str, int, float or list (of paths)
    flags: tuple[str, ...]
    help: str
    aliases: tuple[str, ...] = ()  # other accepted batch row keys


FIELDS: dict[str, Field] = {
    "prompt": Field(str, ("--prompt", "-p"), "What to draw; for edit, the instruction ('make the sky purple')."),
    "negative_prompt": Field(str, ("--negative-prompt", "-n"), "What to steer away from (default: empty, "
                             "as the official pipeline).", ("negative",)),
    "seed": Field(int, ("--seed",), f"Noise seed (default {_SAMPLING.seed}); the same seed gives the same image "
                  f"on every device."),
    "steps": Field(int, ("--steps",), f"Denoising steps ({_model_default('steps', _SAMPLING.steps)})."),
    "guidance": Field(float, ("--guidance", "--cfg"), "Text guidance scale; 1 disables guidance ("
                      + _model_default("guidance_scale", _SAMPLING.guidance_scale) + ").", ("guidance_scale", "cfg")),
    "image_guidance": Field(float, ("--image-guidance",), f"Edits: how strongly to stay with the input images "
                            f"(default {_SAMPLING.image_guidance_scale}; above 1 = 3-way guidance).",
                            ("image_guidance_scale",)),
    "width": Field(int, ("--width", "-W"), f"Width in pixels, a multiple of the model's latent factor (config.json "
                   f"vae_downsample_f; {SIZE_STEP} for TBAC-UniImage-3B). Default: the model's trained size (demo: "
                   f"{_DEMO.get('width', '?')}; TBAC-UniImage-3B: {DEFAULT_IMAGE_SIZE})."),
    "height": Field(int, ("--height", "-H"), "Height in pixels (same rules as --width)."),
    "sampler": Field(str, ("--sampler",), f"{' or '.join(SAMPLERS)} (default: the model's stored setting, else "
                     f"{_SAMPLING.sampler})."),
    "layers": Field(str, ("--layers",), f"Which MLLM layers feed the DiT blocks (default '{DEFAULT_LAYERS}'): "
                    + LAYER_SPEC_SYNTAX + ".", ("layer_spec",)),
    "num_images": Field(int, ("--num-images", "--images-per-prompt"), "Images per prompt, each with its own "
                        "noise from one seed (default 1).", ("images_per_prompt", "num_images_per_prompt", "batch_size")),
    "images": Field(list, ("--image", "-i"), "Input image to edit; repeat for several images.",
                    ("image", "input_images")),
    "init_image": Field(str, ("--init-image",), "Image-to-image: start from this image instead of pure noise."),
    "denoise": Field(float, ("--denoise",), f"Image-to-image: share of the steps to run, in (0, 1] (default "
                     f"{DEFAULT_IMG2IMG_DENOISE} with --init-image); lower keeps more of the image."),
    "cache_threshold": Field(float, ("--cache-threshold",), f"Opt-in step caching (approximate): skip the DiT's "
                             f"blocks after the first when its output changed less than this since the last full "
                             f"step (their change is extrapolated from the last two full steps); "
                             f"0..{MAX_CACHE_THRESHOLD} (default {_SAMPLING.cache_threshold:g} = off, exact; "
                             f"README 'Speed' lists the measured speed-up and image cost)."),
    "cache_max_skips": Field(int, ("--cache-max-skips",), f"With --cache-threshold: at most this many steps in a "
                             f"row skip those blocks before a full step runs again; 1..{MAX_CACHE_SKIPS} (default "
                             f"{_SAMPLING.cache_max_skips}; higher is faster and changes the picture more)."),
    "guidance_cutoff": Field(float, ("--guidance-cutoff",), f"Opt-in guidance truncation (approximate): evaluate "
                             f"the negative (and image-only) branch only for this fraction of the steps, then the "
                             f"prompt alone; 0..1 (default {_SAMPLING.guidance_cutoff:g} = off, exact)."),
}
GENERATE_FIELDS = tuple(k for k in FIELDS if k not in ("images", "image_guidance"))
EDIT_FIELDS = tuple(k for k in FIELDS if k not in ("init_image", "denoise"))
ALIASES = {alias: name for name, spec in FIELDS.items() for alias in (name, *spec.aliases)}


@dataclass(frozen=True)
class Job:
    """One render: a prompt (plus input images for an edit, or an init image) and its settings.

    ``width``/``height`` None mean the model's trained size (or, image-to-image, the init image's).
    ``denoise`` None means 1.0, or ``DEFAULT_IMG2IMG_DENOISE`` with an init image.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = _SAMPLING.seed
    steps: int = _SAMPLING.steps
    guidance: float = _SAMPLING.guidance_scale
    image_guidance: float = _SAMPLING.image_guidance_scale
    width: int | None = None
    height: int | None = None
    sampler: str = _SAMPLING.sampler
    layers: str = DEFAULT_LAYERS
    num_images: int = _SAMPLING.num_images_per_prompt
    images: tuple[str, ...] = ()
    init_image: str | None = None
    denoise: float | None = None
    cache_threshold: float = _SAMPLING.cache_threshold
    cache_max_skips: int = _SAMPLING.cache_max_skips
    guidance_cutoff: float = _SAMPLING.guidance_cutoff
    id: str = "job"
    where: str = "command line"

    @property
    def mode(self) -> str:
        return "edit" if self.images else "img2img" if self.init_image else "generate"

    @property
    def strength(self) -> float:
        if self.denoise is not None:
            return self.denoise
        return DEFAULT_IMG2IMG_DENOISE if self.init_image else 1.0

    @property
    def accelerations(self) -> dict[str, float]:
        """The opt-in accelerations this job turns on (empty: the exact path).

        With step caching on, its ``cache_max_skips`` is recorded even at its default, so the
        record renders the same image if that default ever changes; with caching off it is moot.
        """
        on = {name: getattr(self, name) for name in ACCELERATION_FIELDS
              if getattr(self, name) != getattr(_SAMPLING, name)}
        if "cache_threshold" in on:
            on["cache_max_skips"] = self.cache_max_skips
        else:
            on.pop("cache_max_skips", None)
        return on

    @property
    def image_paths(self) -> tuple[str, ...]:
        return self.images or ((self.init_image,) if self.init_image else ())


def coerce(name: str, value: Any, text: bool = False, base_dir: Path | None = None) -> Any:
    """Convert one row/flag value to the field's type; ``None`` means 'not given'.

    ``text``: the value comes from a CSV cell (always a string; empty = not given). Paths are
    taken relative to ``base_dir`` (the rows file's folder) unless absolute.
    """
    kind = FIELDS[name].kind
    if value is None or (text and isinstance(value, str) and not value.strip()):
        return None
    if kind is list:
        items = value.split(";") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
            raise ValueError(f"expected image paths (a list, or one string with paths separated by ';'), "
                             f"got {value!r}")
        paths = tuple(_path(p.strip(), base_dir) for p in items if p.strip())
        return paths or None
    if name == "init_image":
        if not isinstance(value, str):
            raise ValueError(f"expected an image path, got {value!r}")
        return _path(value.strip(), base_dir)
    if kind is str:
        if name == "layers" and isinstance(value, (list, tuple)) and value:
            value = ",".join(map(str, value))  # a JSON list of rungs is the same as '2,3,4,5'
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _path(text: str, base_dir: Path | None) -> str:
    if "\0" in text:
        raise ValueError(f"a path may not hold a NUL byte: {text!r}")
    path = Path(text).expanduser()
    return str(path if path.is_absolute() or base_dir is None else base_dir / path)


def make_job(values: dict[str, Any], *, job_id: str = "job", where: str = "command line") -> Job:
    """A ``Job`` from already converted values (unknown keys are a programming error)."""
    given = {k: v for k, v in values.items() if v is not None}
    if "prompt" not in given:
        raise JobError(where, [("prompt", "missing; every job needs a prompt (it may be empty: \"\")")])
    if "images" in given:
        given["images"] = tuple(given["images"])
    return Job(**given, id=job_id, where=where)


# Job field -> SamplingParams field: each value is checked alone by the core's own check, so that
# one report lists every problem of a job, not only the first.
_SAMPLING_FIELDS = {"steps": "steps", "guidance": "guidance_scale", "image_guidance": "image_guidance_scale",
                    "sampler": "sampler", "seed": "seed", "cache_threshold": "cache_threshold",
                    "cache_max_skips": "cache_max_skips", "guidance_cutoff": "guidance_cutoff"}


def check_job(job: Job, latent_factor: int) -> list[tuple[str, str]]:
    """Every problem of ``job`` as ``(field, message with what is allowed)``, without the model.

    ``latent_factor``: the checkpoint's ``vae_downsample_f`` (sizes are multiples of it).
    """
    problems = []

    def check(name: str, run) -> None:
        try:
            run()
        except InvalidParameterError as exc:
            problems.append((name, str(exc)))

    for name, param in _SAMPLING_FIELDS.items():
        check(name, lambda: SamplingParams(**{param: getattr(job, name)}).validate())
    check("denoise", lambda: SamplingParams(denoise=job.strength).validate())
    if job.width is not None:
        check("width", lambda: check_size(job.width, latent_factor, latent_factor))
    if job.height is not None:
        check("height", lambda: check_size(latent_factor, job.height, latent_factor))
    check("num_images", lambda: check_batch(job.num_images))
    if job.images and job.init_image:
        problems.append(("init_image", "an edit (input images) cannot also start from an init image; "
                                       "use images for an edit or init_image for image-to-image"))
    for name, paths in (("images", job.images), ("init_image", (job.init_image,) if job.init_image else ())):
        problems += [(name, problem) for problem in map(image_path_problem, paths) if problem]
    return problems


def check_layers(job: Job, identity) -> list[tuple[str, str]]:
    """The layer spec's problem for the loaded model (``identity``: its ``ModelIdentity``), if any."""
    try:
        parse_layer_spec(job.layers, identity.num_rungs, identity.num_dit_blocks)
    except LayerSpecError as exc:
        return [("layers", str(exc))]
    return []


def add_job_options(parser: argparse.ArgumentParser, names: Sequence[str], defaults_note: str = "") -> None:
    group = parser.add_argument_group("generation" + defaults_note)
    for name in names:
        spec = FIELDS[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": spec.help}
        if spec.kind is list:
            kwargs.update(action="append", metavar="PATH")
        elif spec.kind in (int, float):
            kwargs["type"] = spec.kind
        group.add_argument(*spec.flags, **kwargs)


def job_values_from_args(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    values = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            try:
                values[name] = coerce(name, value)
            except ValueError as exc:
                raise UsageError(f"--{name.replace('_', '-')}: {exc}") from None
    return values
