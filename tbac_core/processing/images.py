"""The one normaliser of image inputs, and conversions between image types and PIL RGB images.

One image may be a PIL image of any mode (RGBA, greyscale, 16-bit, palette; its EXIF orientation
is applied), a numpy array or a torch tensor laid out ``[H, W, C]`` (ComfyUI's IMAGE convention,
floats in 0..1) or ``[H, W]``. The images of one prompt may be one image, a list of images or an
image batch ``[B, H, W, C]``; a job's images (``images_per_prompt``) are None, one list shared by
every prompt, or one list per prompt. The pipeline normalises its inputs once, at its boundary,
with these functions; everything after it sees PIL RGB images.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InvalidParameterError
from ..params import MAX_BATCH, check_image_count

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # refuse absurd inputs before converting them
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses more extreme aspect ratios
EXIF_ORIENTATION = 0x0112


def image_list(images) -> list:
    """The images of one prompt as a list: None -> [], one image -> [it], a batch [B, H, W, C] -> B images.

    Refuses more than ``MAX_INPUT_IMAGES`` (an IMAGE batch of video frames counts every frame) and an
    empty IMAGE batch, before any image is converted.
    """
    items = _as_list(images)
    check_image_count(len(items))
    return items


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise InvalidParameterError(
                f"The image batch {tuple(images.shape)} holds no image; connect a batch of at least one image, or "
                f"leave the input unconnected."
            )
        return list(images)  # a ComfyUI IMAGE batch [B, H, W, C]: several images
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def images_per_prompt(images, num_prompts: int) -> list[list[Image.Image]] | None:
    """A job's input images as one list of PIL RGB images per prompt, or None for text-to-image.

    ``images``: None (or only Nones); one image or a flat list (shared by every prompt); an image
    batch; or one list (or batch) per prompt, each with at least one image.
    """
    items = [item for item in _as_list(images) if item is not None]
    if not items:
        return None
    nested = all(isinstance(item, (list, tuple)) for item in items)
    if not nested:
        check_image_count(len(items))
        shared = [to_pil_rgb(item) for item in items]
        return [shared] * num_prompts  # the same objects: each input image is processed once
    if len(items) != num_prompts:
        raise InvalidParameterError(
            f"Got image lists for {len(items)} prompts but {num_prompts} prompts; give one list of input "
            f"images per prompt, or one flat list shared by all prompts."
        )
    lists = [image_list(item) for item in items]  # every count checked before any image is converted
    per_prompt = [[to_pil_rgb(image) for image in images] for images in lists]
    if any(not imgs for imgs in per_prompt):
        raise InvalidParameterError("Every prompt of an edit batch needs at least one input image.")
    return per_prompt


def image_batch(images) -> torch.Tensor:
    """Images (PIL, arrays, or a float tensor [B, H, W, 3] / [H, W, 3] in 0..1) -> float32 [B, H, W, 3].

    Float tensors keep their precision (no round trip through 8 bits); everything else goes
    through ``to_pil_rgb``. All images must share one size.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        tensor = images if images.ndim == 4 else images[None]
        if tensor.ndim != 4 or tensor.shape[-1] != 3 or 0 in tensor.shape:
            raise InvalidParameterError(f"An image tensor must be [B, H, W, 3] in 0..1, got {tuple(images.shape)}.")
        if tensor.shape[0] > MAX_BATCH:
            raise InvalidParameterError(f"A batch of {tensor.shape[0]} images is not allowed: use 1..{MAX_BATCH}.")
        tensor = tensor.detach().float()
        if not torch.isfinite(tensor).all():
            raise InvalidParameterError("Image contains NaN or infinite values.")
        return tensor.clamp(0, 1)
    items = _as_list(images)
    if not items:
        raise InvalidParameterError("No image given: pass at least one image.")
    if len(items) > MAX_BATCH:
        raise InvalidParameterError(f"A batch of {len(items)} images is not allowed: use 1..{MAX_BATCH}.")
    tensors = [pil_to_tensor(to_pil_rgb(image)) for image in items]
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise InvalidParameterError("Images of one batch must share one size; resize them first.")
    return torch.stack(tensors)


def to_pil_rgb(image) -> Image.Image:
    """Return an 8-bit RGB PIL image for ``image`` (PIL, numpy or torch), refusing garbage."""
    if isinstance(image, Image.Image):
        pil = _pil_to_rgb(_upright(image))
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pil = Image.fromarray(_array_to_uint8(image))
    else:
        raise InvalidParameterError(
            f"Unsupported image type {type(image).__name__}: give a PIL image, a numpy array or a torch "
            f"tensor laid out [H, W, C] (RGB, floats in 0..1 or uint8)."
        )
    width, height = pil.size
    if width == 0 or height == 0:
        raise InvalidParameterError(f"Input image of {width}x{height} pixels is empty.")
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


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a rotate tag)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image  # no copy: equal inputs stay the same object (processed once per encode)
    return ImageOps.exif_transpose(image)


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
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidParameterError(
            f"Image array of dtype {array.dtype} is not an image: give floats in 0..1 or integers in 0..255 "
            f"(uint8) / 0..65535 (uint16)."
        )
    if array.shape[0] * array.shape[1] > MAX_INPUT_PIXELS:  # before converting (and copying) it
        raise InvalidParameterError(
            f"Input image of {array.shape[1]}x{array.shape[0]} pixels is larger than the {MAX_INPUT_PIXELS} pixels "
            f"allowed; downscale it first."
        )
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


def image_fingerprint(image: Image.Image) -> str:
    """A content hash of a PIL image: its mode, size and pixels (what the MLLM sees of it)."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images [B, H, W, C] in 0..1 -> uint8 array, rounding like the official pipeline."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
