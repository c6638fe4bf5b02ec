"""Turning user inputs into model inputs: prompt layout, images, and the UI's text conventions."""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".images": ("to_pil_rgb", "pil_to_tensor", "images_to_uint8", "image_list", "images_per_prompt", "image_batch"),
    ".prompt_layout": ("conditioning_rows", "metaquery_positions", "metaquery_suffix"),
    ".ui_inputs": ("split_prompts", "crop_to_multiple"),
    ".prompting": ("PromptBuilder",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
