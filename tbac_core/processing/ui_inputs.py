"""Turning what a user types or wires into a user interface into library arguments.

Small pure helpers shared by the ComfyUI nodes and scripts: a prompt box becomes a batch of
prompts, and an image batch is cropped to a size the DC-AE can encode.
"""
from __future__ import annotations

import torch

from ..errors import InvalidParameterError


def split_prompts(text: str, one_per_line: bool = False) -> list[str]:
    """The prompts of a prompt box: the whole text, or one prompt per non-blank line.

    With ``one_per_line`` each line is stripped and blank lines are skipped, so a pasted list
    with gaps renders one image set per line. A box with no prompt left is refused.
    """
    if not isinstance(text, str):
        raise InvalidParameterError(f"A prompt must be text, got {type(text).__name__}.")
    if not one_per_line:
        return [text]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidParameterError(
            "'one prompt per line' is on but the prompt box has no non-blank line; type one prompt per line "
            "or turn the option off."
        )
    return prompts


def crop_to_multiple(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Centre-crop images [B, H, W, C] so that H and W are multiples of ``factor``.

    At most ``factor - 1`` rows/columns are removed, split between both sides. Images smaller
    than ``factor`` on a side are refused: there is nothing left to encode.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidParameterError(f"Expected an image batch [B, H, W, C], got {shape}.")
    if images.shape[0] == 0:
        raise InvalidParameterError("The image batch holds no image; connect a batch of at least one image.")
    height, width = images.shape[1:3]
    if height < factor or width < factor:
        raise InvalidParameterError(
            f"Image of {width}x{height} is smaller than the latent factor {factor}; upscale it to at least "
            f"{factor}x{factor} first."
        )
    new_height, new_width = height - height % factor, width - width % factor
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return images[:, top:top + new_height, left:left + new_width, :]
