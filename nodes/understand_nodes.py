"""ComfyUI node for image understanding: the checkpoint's frozen Qwen2.5-VL answers about images.

The answer is a STRING: show it with ComfyUI's "Preview as Text" node, or wire it into the
prompt of 'TBAC Ladder Encode' (understand-then-generate / understand-then-edit in one wire).
"""
from __future__ import annotations

from tbac_core.params import MAX_NEW_TOKENS, MAX_SEED, GenerationSettings
from tbac_core.pipeline.understanding import PRESETS, answer, resolve_question
from tbac_core.processing.images import to_pil_rgb

from . import comfy_bridge as bridge
from .model_nodes import MODEL_TOOLTIP, ROOT_CATEGORY

DEFAULTS = GenerationSettings()


class TBACUnderstand:
    DESCRIPTION = (
        "Asks the model's frozen Qwen2.5-VL about the input images (a batch = several images of one "
        "question) and returns its answer as text: captions, descriptions, or a prompt for generation."
    )
    CATEGORY = f"{ROOT_CATEGORY}/understanding"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The answer. Show it with 'Preview as Text' or wire it into a prompt input.",)
    FUNCTION = "understand"

    @classmethod
    def INPUT_TYPES(cls):
        names = list(PRESETS)
        return {
            "required": {
                "model": ("TBAC_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "preset": (names, {
                    "default": names[0],
                    "tooltip": "What to ask. With 'custom' the question box is the whole question; with any "
                               "other preset the question box (if not empty) adds instructions to it.",
                }),
                "question": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "Your question (preset 'custom'), or extra instructions for the chosen preset.",
                }),
                "max_new_tokens": ("INT", {"default": DEFAULTS.max_new_tokens, "min": 1, "max": MAX_NEW_TOKENS,
                                           "tooltip": "Longest answer, in tokens."}),
                "do_sample": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: greedy decoding (the same answer every time). On: sample with the "
                               "temperature / top_p / top_k below and the seed.",
                }),
                "temperature": ("FLOAT", {"default": DEFAULTS.temperature, "min": 0.01, "max": 5.0, "step": 0.01,
                                          "tooltip": "Sampling only: higher is more varied."}),
                "top_p": ("FLOAT", {"default": DEFAULTS.top_p, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "Sampling only: keep the smallest set of tokens with this "
                                               "total probability."}),
                "top_k": ("INT", {"default": DEFAULTS.top_k, "min": 0, "max": 1000,
                                  "tooltip": "Sampling only: keep the k most likely tokens; 0 = no limit."}),
                "repetition_penalty": ("FLOAT", {
                    "default": DEFAULTS.repetition_penalty, "min": 1.0, "max": 3.0, "step": 0.01,
                    "tooltip": "Above 1 discourages repeating tokens (Qwen2.5-VL's release uses 1.05); 1 = off.",
                }),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Sampling only: the same seed repeats the same answer."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The image(s) to ask about; every image of the batch is shown "
                                                "to the model. Unconnected: a text-only question."}),
                "system_prompt": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "Optional system prompt; empty uses Qwen2.5-VL's own default.",
                }),
            },
        }

    def understand(self, model, preset: str, question: str, max_new_tokens: int, do_sample: bool,
                   temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int,
                   images=None, system_prompt: str = ""):
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        text = resolve_question(preset, question)
        pil = [] if images is None else [to_pil_rgb(image) for image in images]
        model.prepare("mllm")
        progress = bridge.Progress(max_new_tokens)
        reply = answer(
            model.model,
            text,
            images=pil,
            system_prompt=system_prompt or None,
            settings=settings,
            callback=progress.token_callback,
            check_cancel=bridge.cancel_check(),
        )
        return (reply,)


NODE_CLASS_MAPPINGS = {"TBACUnderstand": TBACUnderstand}
NODE_DISPLAY_NAME_MAPPINGS = {"TBACUnderstand": "TBAC Understand Image"}
