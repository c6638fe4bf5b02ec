"""ComfyUI nodes for the ladder controls: select layers, weight, mix, inspect, save and load.

Each node is one ``tbac_core.ladder.ops`` call on a ``LADDER_CONDITIONING`` (a
``tbac_core.ladder.conditioning.LadderConditioning``); none of them runs the MLLM. Saved conditionings live in
``<ComfyUI output>/tbac_ladder/`` as ``.safetensors`` files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import tbac_core.ladder as ladder_ops
from tbac_core.errors import InvalidParameterError
from tbac_core.ladder import LAYER_SPEC_SYNTAX, WEIGHT_SPEC_SYNTAX

from . import comfy_bridge as bridge

CATEGORY = "TBAC-UniImage/ladder"
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
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{ladder_ops.FILE_EXTENSION}")
                  if p.is_file() and not p.name.startswith("."))


def _inside(root: Path, candidate: Path) -> bool:
    return candidate.resolve().is_relative_to(root.resolve())


def save_target(prefix: str, root: Path) -> tuple[Path, str]:
    """(folder, file stem) for a filename prefix like ComfyUI's SaveImage: 'name' or 'sub/name'."""
    text = prefix.strip().replace("\\", "/")
    stem = text.rsplit("/", 1)[-1]
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
    suffix = f"_{ladder_ops.FILE_EXTENSION}"
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
    path = path.strip()
    if path:
        target = Path(path).expanduser()
        target = target if target.is_absolute() else root / target
        if target.suffix != ladder_ops.FILE_EXTENSION:
            raise InvalidParameterError(f"path {path!r} is not a {ladder_ops.FILE_EXTENSION} file.")
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


def pil_to_image_batch(image) -> torch.Tensor:
    """PIL RGB -> IMAGE [1, H, W, 3] float32 in 0..1 on the CPU."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


# -- nodes ---------------------------------------------------------------------------------------
class TBACLadderSelectLayers:
    DESCRIPTION = (
        "Chooses again which MLLM layer ('rung') feeds each DiT block, without running the MLLM: the "
        "conditioning must hold the rungs you pick (encode with keep_all_rungs to pick freely). A mix keeps its "
        "shares; every prompt of the block moves to the new rung."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LADDER_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The same conditioning with the new layer-to-block mapping.",)
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("LADDER_CONDITIONING", {"tooltip": CONDITIONING_TOOLTIP}),
                "layers": ("STRING", {
                    "default": "default",
                    "tooltip": "Which MLLM layers feed the DiT blocks, as in 'TBAC Ladder Encode': " + LAYER_SPEC_SYNTAX
                               + ". Shallow layers carry more of the wording, deep ones more of the meaning.",
                }),
            }
        }

    def select(self, conditioning, layers: str):
        return (ladder_ops.select_layers(conditioning, layers),)


class TBACLadderWeight:
    DESCRIPTION = (
        "Scales how strongly each DiT block follows the prompt, e.g. '0-9:1.0, 10-19:0.6' or a ramp '1.0->0.2'. "
        "Weight 1 changes nothing; weight 0 makes a block ignore the prompt (its cross-attention sees a zero "
        "condition). Applied after the connector, in every guidance branch."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LADDER_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The conditioning with per-block strengths.",)
    FUNCTION = "weight"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("LADDER_CONDITIONING", {"tooltip": CONDITIONING_TOOLTIP}),
                "weights": ("STRING", {
                    "default": "1.0",
                    "tooltip": "Per-block strength: " + WEIGHT_SPEC_SYNTAX + ". Blocks are numbered from 0 (first, "
                               "coarse layout) to the last DiT block (fine detail).",
                }),
            }
        }

    def weight(self, conditioning, weights: str):
        return (ladder_ops.weight_blocks(conditioning, weights),)


class TBACLadderMix:
    DESCRIPTION = (
        "Combines two conditionings block by block: e.g. '0-9:a, 10-19:b' takes the layout blocks from A and "
        "the detail blocks from B, 'fade' cross-fades from A to B along the DiT's depth. Mixing happens after "
        "the connector, on exactly what each block reads, so a blend stays a blend."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LADDER_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Per block (1 - t) x A + t x B.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a": ("LADDER_CONDITIONING", {"tooltip": "Conditioning A (e.g. the prompt for the layout)."}),
                "b": ("LADDER_CONDITIONING", {
                    "tooltip": "Conditioning B (e.g. the prompt for the details). Same model as A, and the same "
                               "number of prompts as A (or a single prompt on one side).",
                }),
                "mix": ("STRING", {
                    "default": "fade",
                    "tooltip": "Which blocks come from A and which from B: " + ladder_ops.MIX_SPEC_SYNTAX + ".",
                }),
            }
        }

    def mix(self, a, b, mix: str):
        return (ladder_ops.mix(a, b, mix),)


class TBACLadderInspect:
    DESCRIPTION = (
        "Draws the conditioning as heat-maps: per MLLM layer the size (norm) of the metaquery states, which "
        "layer feeds which DiT block with which weight, and, with a second conditioning, how similar the two "
        "are per layer and per block. Also returns the numbers as text."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "summary")
    OUTPUT_TOOLTIPS = (
        "The heat-maps as one image: wire into Preview Image or Save Image.",
        "The mapping, norms and similarities as text: wire into a text preview.",
    )
    FUNCTION = "inspect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("LADDER_CONDITIONING", {"tooltip": CONDITIONING_TOOLTIP}),
            },
            "optional": {
                "other": ("LADDER_CONDITIONING", {
                    "tooltip": "A second conditioning to compare with (cosine similarity per layer and per block).",
                }),
                "model": ("TBAC_MODEL", {
                    "tooltip": "Optional: with the model, the per-block similarity is measured on what the blocks "
                               "really read (after the connector); without it, on the MLLM states.",
                }),
            },
        }

    def inspect(self, conditioning, other=None, model=None):
        embed = None
        if model is not None:
            conditioning.check_model(model.identity)
            if other is not None:  # the model is only needed to embed both for the per-block similarity
                other.check_model(model.identity)
                model.prepare("dit")
                embed = model.model.dit.embed_condition
        image, summary = ladder_ops.inspect(conditioning, other, embed)
        return (pil_to_image_batch(image), summary)


class TBACLadderSave:
    DESCRIPTION = (
        "Saves a ladder conditioning (metaquery states of every kept layer, prompts, model identity and the "
        "block mapping) to ComfyUI's output folder, tbac_ladder/<prefix>_00001_.safetensors, so a look can be "
        "reused or shared without running the MLLM. Never overwrites: the counter goes up."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside output/tbac_ladder (what 'TBAC Ladder Load' lists).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("LADDER_CONDITIONING", {"tooltip": CONDITIONING_TOOLTIP}),
                "filename_prefix": ("STRING", {
                    "default": DEFAULT_PREFIX,
                    "tooltip": "File name start inside output/tbac_ladder; a counter and .safetensors are added. "
                               "May name a sub-folder, like 'looks/portrait'.",
                }),
            }
        }

    def save(self, conditioning, filename_prefix: str):
        root = saved_root()
        folder, stem = save_target(filename_prefix, root)
        for _ in range(MAX_SAVE_ATTEMPTS):
            path = folder / f"{stem}_{next_counter(folder, stem):05}_{ladder_ops.FILE_EXTENSION}"
            try:
                ladder_ops.save_conditioning(conditioning, path)
                break
            except FileExistsError:  # another run took this number meanwhile: count again
                continue
        else:
            raise InvalidParameterError(f"Could not find a free file name for {stem!r} in {folder}.")
        name = path.relative_to(root).as_posix()
        return {"ui": {"text": [f"{SAVE_SUBFOLDER}/{name}"]}, "result": (name,)}


class TBACLadderLoad:
    DESCRIPTION = (
        "Loads a conditioning saved by 'TBAC Ladder Save' (from output/tbac_ladder, or any path), without the "
        "MLLM. Refuses a file made by another model. Only safetensors and JSON are read."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LADDER_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The saved conditioning, ready for the sampler or the other ladder nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TBAC_MODEL", {
                    "tooltip": "The model you will sample with: the file must have been made by the same model.",
                }),
                "file": ([NO_FILE] + list_saved(saved_root()), {
                    "default": NO_FILE,
                    "tooltip": "A saved conditioning in output/tbac_ladder (press R after saving to refresh).",
                }),
                "path": ("STRING", {
                    "default": "",
                    "tooltip": "Optional: a .safetensors path (absolute, or inside output/tbac_ladder). When not "
                               "empty it is used instead of 'file'.",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, file: str = NO_FILE, path: str = "", **_):
        """Re-run when the file changes on disk (ComfyUI otherwise caches by the widget values)."""
        try:
            stat = load_path(file, path, saved_root()).stat()
        except (OSError, InvalidParameterError):
            return "missing"
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def load(self, model, file: str, path: str):
        target = load_path(file, path, saved_root())
        cond = ladder_ops.load_conditioning(target, expected=model.identity)
        return (cond.to(device=bridge.intermediate_device()),)


NODE_CLASS_MAPPINGS = {
    "TBACLadderSelectLayers": TBACLadderSelectLayers,
    "TBACLadderWeight": TBACLadderWeight,
    "TBACLadderMix": TBACLadderMix,
    "TBACLadderInspect": TBACLadderInspect,
    "TBACLadderSave": TBACLadderSave,
    "TBACLadderLoad": TBACLadderLoad,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TBACLadderSelectLayers": "TBAC Ladder Select Layers",
    "TBACLadderWeight": "TBAC Ladder Weight",
    "TBACLadderMix": "TBAC Ladder Mix",
    "TBACLadderInspect": "TBAC Ladder Inspect",
    "TBACLadderSave": "TBAC Ladder Save",
    "TBACLadderLoad": "TBAC Ladder Load",
}
