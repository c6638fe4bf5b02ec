"""Ladder nodes: select layers, weight, mix, inspect, save and load a ``LADDER_CONDITIONING``.

Each node is one ``tbac_core.ladder`` call; none of them runs the MLLM. Select / weight / mix are one
shape (conditionings and a spec string in, an edited conditioning out) and share ``LadderEdit``.
Saved conditionings live in ``<ComfyUI output>/tbac_ladder/`` as ``.safetensors`` files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

from ..tbac_core import ladder
from ..tbac_core.errors import InvalidParameterError
from ..tbac_core.io import check_name_length, check_path_text
from ..tbac_core.ladder import (
    FILE_EXTENSION,
    LAYER_SPEC_SYNTAX,
    MIX_SPEC_SYNTAX,
    WEIGHT_SPEC_SYNTAX,
)
from ..tbac_core.processing import pil_to_tensor
from . import comfy_bridge as bridge
from .comfy_bridge import LADDER_CONDITIONING, TBAC_MODEL, io
from .loader import ROOT_CATEGORY

CATEGORY = f"{ROOT_CATEGORY}/ladder"
SAVE_SUBFOLDER = "tbac_ladder"
NO_FILE = "none"
DEFAULT_PREFIX = "TBAC_ladder"
MAX_SAVE_ATTEMPTS = 100

CONDITIONING_TOOLTIP = "A ladder conditioning from 'TBAC Ladder Encode' or another ladder node."


# -- saved-conditioning folder -------------------------------------------------------------------
def saved_root() -> Path:
    """``<output>/tbac_ladder``: where the Save node writes and the Load node lists."""
    return bridge.output_directory() / SAVE_SUBFOLDER


def list_saved(root: Path) -> list[str]:
    """Saved conditionings under ``root`` (sub-folders included), as sorted '/'-separated names."""
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{FILE_EXTENSION}")
                  if p.is_file() and not p.name.startswith("."))


def _inside(root: Path, candidate: Path) -> bool:
    return candidate.resolve().is_relative_to(root.resolve())


def save_target(prefix: str, root: Path) -> tuple[Path, str]:
    """(folder, file stem) for a filename prefix like ComfyUI's SaveImage: 'name' or 'sub/name'."""
    check_path_text(prefix, "filename_prefix")
    text = prefix.strip().replace("\\", "/")
    stem = text.rsplit("/", 1)[-1]
    check_name_length(f"{stem}_{99999:05}_{FILE_EXTENSION}", "filename_prefix")  # with its counter
    if not stem or stem in (".", ".."):
        raise InvalidParameterError(
            f"filename_prefix {prefix!r} has no file name; write e.g. '{DEFAULT_PREFIX}' or 'looks/portrait'."
        )
    folder = root / Path(text).parent
    if Path(text).is_absolute() or not _inside(root, folder / stem):
        raise InvalidParameterError(
            f"filename_prefix {prefix!r} points outside the {SAVE_SUBFOLDER} folder of ComfyUI's output; "
            f"use a plain name or a sub-folder like 'looks/portrait'."
        )
    return folder, stem


def next_counter(folder: Path, stem: str) -> int:
    """1 + the highest counter of ``<stem>_<counter>_.safetensors`` in ``folder`` (1 when none)."""
    highest = 0
    suffix = f"_{FILE_EXTENSION}"
    if folder.is_dir():
        for path in folder.iterdir():
            name = path.name
            if name.startswith(f"{stem}_") and name.endswith(suffix):
                digits = name[len(stem) + 1: -len(suffix)]
                if digits.isascii() and digits.isdigit():
                    highest = max(highest, int(digits))
    return highest + 1


def load_path(file: str, path: str, root: Path) -> Path:
    """The file to load: ``path`` when given (absolute, or relative to ``root``), else the listed ``file``."""
    check_path_text(path, "path")
    path = path.strip()
    if path:
        target = Path(path).expanduser()
        target = target if target.is_absolute() else root / target
        if target.suffix != FILE_EXTENSION:
            raise InvalidParameterError(f"path {path!r} is not a {FILE_EXTENSION} file.")
        return target
    available = list_saved(root)
    if file == NO_FILE or file not in available:
        listed = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "") or "(none)"
        what = "No file was chosen" if file == NO_FILE else f"{file!r} is not a saved conditioning"
        raise InvalidParameterError(
            f"{what} in {root}. Saved there: {listed}. Save one with 'TBAC Ladder Save' (then press R to refresh "
            f"the list) or type a path."
        )
    return root / file


# -- select, weight, mix: one shape -------------------------------------------------------------
class LadderEdit(io.ComfyNode):
    """Conditioning input(s) and one spec string in, ``edit(*conditionings, spec)`` out.

    A subclass names its node, its conditioning inputs, its spec input and the library edit.
    """

    node_id: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    output_tooltip: ClassVar[str]
    edit: ClassVar[Callable]  # (conditioning..., spec: str) -> LadderConditioning

    @classmethod
    def conditioning_inputs(cls) -> list[io.Input]:
        return [LADDER_CONDITIONING.Input("conditioning", tooltip=CONDITIONING_TOOLTIP)]

    @classmethod
    def spec_input(cls) -> io.Input:
        raise NotImplementedError

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.node_id,
            display_name=cls.title,
            category=CATEGORY,
            description=cls.summary,
            inputs=[*cls.conditioning_inputs(), cls.spec_input()],
            outputs=[LADDER_CONDITIONING.Output("conditioning", tooltip=cls.output_tooltip)],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        names = [i.id for i in cls.conditioning_inputs()] + [cls.spec_input().id]
        return io.NodeOutput(cls.edit(*(inputs[name] for name in names)))


class TBACLadderSelectLayers(LadderEdit):
    node_id = "TBACLadderSelectLayers"
    title = "TBAC Ladder Select Layers"
    summary = (
        "Chooses again which MLLM layer ('rung') feeds each DiT block, without running the MLLM: the "
        "conditioning must hold the rungs you pick (encode with keep_all_rungs to pick freely). A mix keeps its "
        "shares; every prompt of the block moves to the new rung."
    )
    output_tooltip = "The same conditioning with the new layer-to-block mapping."
    edit = staticmethod(ladder.select_layers)

    @classmethod
    def spec_input(cls) -> io.Input:
        return io.String.Input("layers", default="default", tooltip=(
            "Which MLLM layers feed the DiT blocks, as in 'TBAC Ladder Encode': " + LAYER_SPEC_SYNTAX
            + ". Shallow layers carry more of the wording, deep ones more of the meaning."))


class TBACLadderWeight(LadderEdit):
    node_id = "TBACLadderWeight"
    title = "TBAC Ladder Weight"
    summary = (
        "Scales how strongly each DiT block follows the prompt, e.g. '0-9:1.0, 10-19:0.6' or a ramp '1.0->0.2'. "
        "Weight 1 changes nothing; weight 0 makes a block ignore the prompt (its cross-attention sees a zero "
        "condition). Applied after the connector, in every guidance branch."
    )
    output_tooltip = "The conditioning with per-block strengths."
    edit = staticmethod(ladder.weight_blocks)

    @classmethod
    def spec_input(cls) -> io.Input:
        return io.String.Input("weights", default="1.0", tooltip=(
            "Per-block strength: " + WEIGHT_SPEC_SYNTAX + ". Blocks are numbered from 0 (first, coarse layout) "
            "to the last DiT block (fine detail)."))


class TBACLadderMix(LadderEdit):
    node_id = "TBACLadderMix"
    title = "TBAC Ladder Mix"
    summary = (
        "Combines two conditionings block by block: e.g. '0-9:a, 10-19:b' takes the layout blocks from A and "
        "the detail blocks from B, 'fade' cross-fades from A to B along the DiT's depth. Mixing happens after "
        "the connector, on exactly what each block reads, so a blend stays a blend."
    )
    output_tooltip = "Per block (1 - t) x A + t x B."
    edit = staticmethod(ladder.mix)

    @classmethod
    def conditioning_inputs(cls) -> list[io.Input]:
        return [
            LADDER_CONDITIONING.Input("a", tooltip="Conditioning A (e.g. the prompt for the layout)."),
            LADDER_CONDITIONING.Input("b", tooltip=(
                "Conditioning B (e.g. the prompt for the details). Same model as A, and the same number of "
                "prompts as A (or a single prompt on one side).")),
        ]

    @classmethod
    def spec_input(cls) -> io.Input:
        return io.String.Input("mix", default="fade", tooltip=(
            "Which blocks come from A and which from B: " + MIX_SPEC_SYNTAX + "."))


# -- inspect, save, load ---------------------------------------------------------------------------
class TBACLadderInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACLadderInspect",
            display_name="TBAC Ladder Inspect",
            category=CATEGORY,
            description=(
                "Draws the conditioning as heat-maps: per MLLM layer the size (norm) of the metaquery states, which "
                "layer feeds which DiT block with which weight, and, with a second conditioning, how similar the two "
                "are per layer and per block. Also returns the numbers as text."
            ),
            inputs=[
                LADDER_CONDITIONING.Input("conditioning", tooltip=CONDITIONING_TOOLTIP),
                LADDER_CONDITIONING.Input("other", optional=True, tooltip=(
                    "A second conditioning to compare with (cosine similarity per layer and per block).")),
                TBAC_MODEL.Input("model", optional=True, tooltip=(
                    "Optional: with the model, the per-block similarity is measured on what the blocks really read "
                    "(after the connector); without it, on the MLLM states.")),
            ],
            outputs=[
                io.Image.Output("plot", tooltip="The heat-maps as one image: wire into Preview Image or Save Image."),
                io.String.Output("summary", tooltip=(
                    "The mapping, norms and similarities as text: wire into a text preview.")),
            ],
        )

    @classmethod
    def execute(cls, conditioning, other=None, model=None) -> io.NodeOutput:
        if model is not None:
            for cond in (conditioning, other):
                if cond is not None:
                    cond.check_model(model.identity)
        if model is None or other is None:  # the model is only needed to embed both for the per-block similarity
            image, summary = ladder.inspect(conditioning, other, None)
        else:
            with model.pipeline.placement.use("dit") as dit:
                image, summary = ladder.inspect(conditioning, other, dit.embed_condition)
        return io.NodeOutput(pil_to_tensor(image)[None], summary)  # IMAGE [1, H, W, 3]


class TBACLadderSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACLadderSave",
            display_name="TBAC Ladder Save",
            category=CATEGORY,
            description=(
                "Saves a ladder conditioning (metaquery states of every kept layer, prompts, model identity and the "
                "block mapping) to ComfyUI's output folder, tbac_ladder/<prefix>_00001_.safetensors, so a look can "
                "be reused or shared without running the MLLM. Never overwrites: the counter goes up."
            ),
            inputs=[
                LADDER_CONDITIONING.Input("conditioning", tooltip=CONDITIONING_TOOLTIP),
                io.String.Input("filename_prefix", default=DEFAULT_PREFIX, tooltip=(
                    "File name start inside output/tbac_ladder; a counter and .safetensors are added. May name a "
                    "sub-folder, like 'looks/portrait'.")),
            ],
            outputs=[io.String.Output("file", tooltip=(
                "The saved file's name inside output/tbac_ladder (what 'TBAC Ladder Load' lists)."))],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, conditioning, filename_prefix: str) -> io.NodeOutput:
        root = saved_root()
        folder, stem = save_target(filename_prefix, root)
        for _ in range(MAX_SAVE_ATTEMPTS):
            path = folder / f"{stem}_{next_counter(folder, stem):05}_{FILE_EXTENSION}"
            try:
                ladder.save_conditioning(conditioning, path)
                break
            except FileExistsError:  # another run took this number meanwhile: count again
                continue
        else:
            raise InvalidParameterError(f"Could not find a free file name for {stem!r} in {folder}.")
        name = path.relative_to(root).as_posix()
        return io.NodeOutput(name, ui={"text": [f"{SAVE_SUBFOLDER}/{name}"]})


class TBACLadderLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACLadderLoad",
            display_name="TBAC Ladder Load",
            category=CATEGORY,
            description=(
                "Loads a conditioning saved by 'TBAC Ladder Save' (from output/tbac_ladder, or any path), without the "
                "MLLM. Refuses a file made by another model. Only safetensors and JSON are read."
            ),
            inputs=[
                TBAC_MODEL.Input("model", tooltip=(
                    "The model you will sample with: the file must have been made by the same model.")),
                io.Combo.Input("file", options=[NO_FILE, *list_saved(saved_root())], default=NO_FILE, tooltip=(
                    "A saved conditioning in output/tbac_ladder (press R after saving to refresh).")),
                io.String.Input("path", default="", tooltip=(
                    "Optional: a .safetensors path (absolute, or inside output/tbac_ladder). When not empty it is "
                    "used instead of 'file'.")),
            ],
            outputs=[LADDER_CONDITIONING.Output("conditioning", tooltip=(
                "The saved conditioning, ready for the sampler or the other ladder nodes."))],
        )

    @classmethod
    def fingerprint_inputs(cls, file: str = NO_FILE, path: str = "", **_):
        """Re-run when the file changes on disk (ComfyUI otherwise caches by the widget values)."""
        try:
            stat = load_path(file, path, saved_root()).stat()
        except (OSError, InvalidParameterError):
            return "missing"
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    @classmethod
    def execute(cls, model, file: str, path: str) -> io.NodeOutput:
        cond = ladder.load_conditioning(load_path(file, path, saved_root()), expected=model.identity)
        return io.NodeOutput(cond.to(device=bridge.intermediate_device()))


NODES = [TBACLadderSelectLayers, TBACLadderWeight, TBACLadderMix, TBACLadderInspect, TBACLadderSave, TBACLadderLoad]
