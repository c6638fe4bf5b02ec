"""Turning user inputs into model inputs: prompt layout, images, and the UI's text conventions."""
from .._exports import lazy_exports

_EXPORTS = {
    "to_pil_rgb": ".images",
    "pil_to_tensor": ".images",
    "images_to_uint8": ".images",
    "image_list": ".images",
    "images_per_prompt": ".images",
    "image_batch": ".images",
    "conditioning_rows": ".prompt_layout",
    "metaquery_positions": ".prompt_layout",
    "metaquery_suffix": ".prompt_layout",
    "split_prompts": ".ui_inputs",
    "crop_to_multiple": ".ui_inputs",
    "PromptBuilder": ".prompting",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
