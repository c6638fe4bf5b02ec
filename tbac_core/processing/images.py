"""Conversions between the image types users hand us and PIL RGB images.

Inputs may be PIL images of any mode (RGBA, greyscale, 16-bit, palette), numpy arrays or torch
tensors laid out ``[H, W, C]`` (ComfyUI's IMAGE convention, floats in 0..1) or ``[H, W]``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidParameterError

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # refuse absurd inputs before converting them
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses more extreme aspect ratios


def to_pil_rgb(image) -> Image.Image:
    """Return an 8-bit RGB PIL image for ``image`` (PIL, numpy or torch), refusing garbage."""
    if isinstance(image, Image.Image):
        pil = _pil_to_rgb(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pil = Image.fromarray(_array_to_uint8(image))
    else:
        raise InvalidParameterError(
            f"Unsupported image type {type(image).__name__}: give a PIL image, a numpy array or a torch "
            f"tensor laid out [H, W, C] (RGB, floats in 0..1 or uint8)."
        )
    width, height = pil.size
    if width * height > MAX_INPUT_PIXELS:
        raise InvalidParameterError(
            f"Input image of {width}x{height} pixels is larger than the {MAX_INPUT_PIXELS} pixels allowed; "
            f"downscale it first (it is resized to about 448x448 for the MLLM anyway)."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidParameterError(
            f"Input image of {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}:1, which the "
            f"Qwen2.5-VL image processor cannot handle; crop it first."
        )
    return pil


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips 16-bit and float values at 255 (white); rescale instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white like the Qwen2-VL processor does, rather than dropping alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_uint8(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu")
        array = array.float().numpy() if array.is_floating_point() else array.numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InvalidParameterError(
            f"Image array of shape {tuple(array.shape)} is not [H, W, C] with C in 1, 3 or 4."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidParameterError(f"Image array of shape {tuple(array.shape)} is empty.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidParameterError("Image contains NaN or infinite values.")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:4].astype(np.float64) / 255.0
        array = np.rint(array[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(array)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images [B, H, W, C] in 0..1 -> uint8 array, rounding like the official pipeline."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
