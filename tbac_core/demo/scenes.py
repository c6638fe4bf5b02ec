"""Synthetic scenes with exact captions: one coloured shape on a coloured background.

The demo model is trained on these, so its captions use a closed vocabulary
(``a red circle on a blue background``) and every image's content is known exactly. The same
module measures generated images (``measure_scene``): the background colour from the border
ring, the shape colour from the centre, each pixel snapped to the nearest palette colour.

Some (colour, shape, background) combinations are held out of training
(``split_scenes``), so a test can ask for prompts the model never saw together.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Palette chosen so that every pair is far apart in RGB (the closest, orange/yellow, is 80 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "purple": (140, 50, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downscaled: smooth edges like real images


@dataclass(frozen=True)
class Scene:
    colour: str  # of the shape
    shape: str
    background: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every (colour, shape, background) with a shape colour different from the background."""
    return [Scene(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def split_scenes(num_held_out: int, seed: int) -> tuple[list[Scene], list[Scene]]:
    """(train, held_out): ``num_held_out`` combinations never shown in training.

    Held-out scenes are drawn so that each held-out colour pair still appears in training with
    the other shapes: the test asks for new combinations of known words, not for unseen words.
    """
    scenes = all_scenes()
    rng = random.Random(seed)
    order = scenes[:]
    rng.shuffle(order)
    held_out: list[Scene] = []
    used_pairs: set[tuple[str, str]] = set()
    for scene in order:
        if len(held_out) == num_held_out:
            break
        pair = (scene.colour, scene.background)
        if pair not in used_pairs:  # at most one shape per colour pair is held out
            held_out.append(scene)
            used_pairs.add(pair)
    held = set(held_out)
    return [s for s in scenes if s not in held], held_out


@dataclass(frozen=True)
class Layout:
    """Where the shape sits: centre offset and size as fractions of the image side."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 0.55

    @classmethod
    def random(cls, rng: random.Random) -> "Layout":
        # Small jitter only: the centre of the image always lies inside the shape.
        return cls(rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), rng.uniform(0.48, 0.62))


def render_scene(scene: Scene, size: int, layout: Layout = Layout()) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image."""
    return draw_shape(scene.shape, COLOURS[scene.colour], COLOURS[scene.background], size, layout)


def draw_shape(shape: str, fill: tuple[int, int, int], background: tuple[int, int, int], size: int,
               layout: Layout = Layout()) -> Image.Image:
    """A ``size`` x ``size`` RGB image of ``shape`` filled with the RGB ``fill`` on ``background``."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    half = layout.scale * big / 2
    cx, cy = big / 2 + layout.dx * big, big / 2 + layout.dy * big
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        side = half * 0.9  # a square looks larger than a circle of the same width
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif shape == "triangle":
        # Centred on its bounding box, so the image centre is inside (the triangle is widest there).
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; known: {', '.join(SHAPES)}.")
    return image.resize((size, size), Image.BOX)


# -- measuring ------------------------------------------------------------------------------
UNKNOWN = "unknown"
MAX_SNAP_DISTANCE = 90.0  # RGB distance beyond which a pixel matches no palette colour


def snap_colours(pixels: np.ndarray) -> list[str]:
    """Nearest palette colour name of each RGB pixel [..., 3] (``unknown`` if none is close)."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)  # [K, 3]
    flat = pixels.reshape(-1, 3).astype(np.float32)
    distance = np.linalg.norm(flat[:, None, :] - palette[None], axis=-1)  # [P, K]
    nearest = distance.argmin(axis=1)
    close = distance[np.arange(len(flat)), nearest] <= MAX_SNAP_DISTANCE
    return [names[k] if ok else UNKNOWN for k, ok in zip(nearest, close)]


def _majority(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    best = max(counts, key=lambda n: (counts[n], n != UNKNOWN))
    return best if counts[best] * 2 > len(names) else UNKNOWN  # a real majority, else unknown


def measure_scene(image) -> tuple[str, str]:
    """(background colour, shape colour) of an image, by majority of snapped pixels.

    Background: the outer ring one eighth of the side wide. Shape: the central square one
    quarter of the side wide. A colour needs more than half of its region's pixels, otherwise
    it is ``unknown`` (a smeared or missing shape never passes by luck).
    """
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype != np.uint8:  # float images in 0..1
        array = np.clip(np.asarray(array, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    height, width = array.shape[:2]
    ring = max(1, min(height, width) // 8)
    border = np.concatenate([
        array[:ring].reshape(-1, 3), array[-ring:].reshape(-1, 3),
        array[ring:-ring, :ring].reshape(-1, 3), array[ring:-ring, -ring:].reshape(-1, 3),
    ])
    ch, cw = max(1, height // 8), max(1, width // 8)
    centre = array[height // 2 - ch: height // 2 + ch, width // 2 - cw: width // 2 + cw].reshape(-1, 3)
    return _majority(snap_colours(border)), _majority(snap_colours(centre))


def measure_shape(image, colour: str) -> str:
    """Which shape the pixels of ``colour`` form, from how much of their bounding box they fill.

    A square fills ~100 % of its box, a circle ~79 % (pi/4), the triangle ~50 %. Returns
    ``unknown`` when fewer than 4 % of the pixels have that colour. A rough measure, for reports.
    """
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    height, width = array.shape[:2]
    mask = np.array(snap_colours(array), dtype=object).reshape(height, width) == colour
    if mask.sum() < 0.04 * height * width:
        return UNKNOWN
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    return "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"


def scene_matches(image, scene: Scene) -> bool:
    return measure_scene(image) == (scene.background, scene.colour)


# -- writing datasets -----------------------------------------------------------------------
def write_caption_folder(folder: str | Path, scenes: list[Scene], size: int, per_scene: int, seed: int) -> int:
    """Write ``per_scene`` jittered images of each scene as ``NNNNN.png`` + ``NNNNN.txt``.

    This is the trainer's image/caption folder layout. Returns the number of images written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    index = 0
    for scene in scenes:
        for _ in range(per_scene):
            stem = f"{index:05d}"
            render_scene(scene, size, Layout.random(rng)).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
            index += 1
    return index


EDIT_KINDS = ("colour", "background")  # what the demo's edit triples change (one attribute each)


def edit_instruction(source: Scene, target: Scene) -> str:
    """``make the circle green`` / ``change the background to black`` / ``turn the circle into a square``."""
    if source.colour != target.colour:
        return f"make the {source.shape} {target.colour}"
    if source.background != target.background:
        return f"change the background to {target.background}"
    return f"turn the {source.shape} into a {target.shape}"


def edit_target(source: Scene, kind: str, rng: random.Random) -> Scene:
    """``source`` with one attribute (``kind``: colour, background or shape) changed at random."""
    others = [c for c in COLOURS if c not in (source.colour, source.background)]
    if kind == "colour":
        return Scene(rng.choice(others), source.shape, source.background)
    if kind == "background":
        return Scene(source.colour, source.shape, rng.choice(others))
    if kind == "shape":
        return Scene(source.colour, rng.choice([s for s in SHAPES if s != source.shape]), source.background)
    raise ValueError(f"Unknown edit kind {kind!r}; known: colour, background, shape.")


def write_edit_folder(folder: str | Path, scenes: list[Scene], size: int, count: int, seed: int,
                      kinds: tuple[str, ...] = EDIT_KINDS) -> int:
    """Write ``count`` edit triples (one attribute changed) in the trainer's edit layout.

    ``NNNNN_source.png`` + ``NNNNN.txt`` (the instruction) + ``NNNNN_target.png``; the source and
    target share the layout, so only the named attribute changes. Source and target are both
    among ``scenes`` (held-out combinations stay out of training).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    allowed = set(scenes)
    written = 0
    while written < count:
        source = rng.choice(scenes)
        target = edit_target(source, rng.choice(kinds), rng)
        if target not in allowed:
            continue
        layout = Layout.random(rng)
        stem = f"{written:05d}"
        render_scene(source, size, layout).save(folder / f"{stem}_source.png")
        render_scene(target, size, layout).save(folder / f"{stem}_target.png")
        (folder / f"{stem}.txt").write_text(edit_instruction(source, target) + "\n", encoding="utf-8")
        written += 1
    return written


def held_out_edits(train: list[Scene], held_out: list[Scene], seed: int,
                   kinds: tuple[str, ...] = EDIT_KINDS) -> list[tuple[Scene, Scene]]:
    """(source, target) pairs, one per held-out scene and kind, whose TARGET is the held-out scene.

    The source is a training scene one attribute away; the result is a combination the model never
    saw, in any job. Deterministic in ``seed``.
    """
    rng = random.Random(seed)
    known = set(train)
    pairs = []
    for target in held_out:
        for kind in kinds:
            if kind == "colour":
                options = [Scene(c, target.shape, target.background) for c in COLOURS]
            elif kind == "background":
                options = [Scene(target.colour, target.shape, b) for b in COLOURS]
            else:
                options = [Scene(target.colour, s, target.background) for s in SHAPES]
            sources = [s for s in options if s in known and s != target]
            if sources:
                pairs.append((rng.choice(sources), target))
    return pairs


def vocabulary() -> list[str]:
    """Every word a demo caption or edit instruction uses."""
    words = {"a", "on", "background", "make", "the", "turn", "into", "change", "to", *COLOURS, *SHAPES}
    return sorted(words)


def save_split(path: str | Path, train: list[Scene], held_out: list[Scene]) -> None:
    data = {"train": [s.caption() for s in train], "held_out": [s.caption() for s in held_out]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def load_split(path: str | Path) -> tuple[list[Scene], list[Scene]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [parse_caption(c) for c in data["train"]], [parse_caption(c) for c in data["held_out"]]


def parse_caption(caption: str) -> Scene:
    words = caption.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"Not a demo caption: {caption!r} (expected 'a <colour> <shape> on a <colour> background').")
    scene = Scene(words[1], words[2], words[5])
    if scene.colour not in COLOURS or scene.background not in COLOURS or scene.shape not in SHAPES:
        raise ValueError(f"Unknown colour or shape in {caption!r}.")
    return scene
