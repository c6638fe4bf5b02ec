"""The understand node: the checkpoint's frozen Qwen2.5-VL answers about images, as a STRING.

Show the answer with ComfyUI's "Preview as Text" node, or wire it into the prompt of 'TBAC Ladder
Encode' (understand-then-generate / understand-then-edit in one wire).
"""
from __future__ import annotations

from ..tbac_core.params import MAX_NEW_TOKENS, MAX_SEED, GenerationSettings
from ..tbac_core.pipeline import PRESETS, answer, resolve_question
from . import comfy_bridge as bridge
from .comfy_bridge import TBAC_MODEL, io
from .loader import MODEL_TOOLTIP, ROOT_CATEGORY

DEFAULTS = GenerationSettings()


class TBACUnderstand(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        presets = list(PRESETS)
        return io.Schema(
            node_id="TBACUnderstand",
            display_name="TBAC Understand Image",
            category=f"{ROOT_CATEGORY}/understanding",
            description=(
                "Asks the model's frozen Qwen2.5-VL about the input images (a batch = several images of one "
                "question) and returns its answer as text: captions, descriptions, or a prompt for generation."
            ),
            inputs=[
                TBAC_MODEL.Input("model", tooltip=MODEL_TOOLTIP),
                io.Combo.Input("preset", options=presets, default=presets[0], tooltip=(
                    "What to ask. With 'custom' the question box is the whole question; with any other preset the "
                    "question box (if not empty) adds instructions to it.")),
                io.String.Input("question", multiline=True, default="", tooltip=(
                    "Your question (preset 'custom'), or extra instructions for the chosen preset.")),
                io.Int.Input("max_new_tokens", default=DEFAULTS.max_new_tokens, min=1, max=MAX_NEW_TOKENS,
                             tooltip="Longest answer, in tokens."),
                io.Boolean.Input("do_sample", default=DEFAULTS.do_sample, tooltip=(
                    "Off: greedy decoding (the same answer every time). On: sample with the temperature / top_p / "
                    "top_k below and the seed.")),
                io.Float.Input("temperature", default=DEFAULTS.temperature, min=0.01, max=5.0, step=0.01,
                               tooltip="Sampling only: higher is more varied."),
                io.Float.Input("top_p", default=DEFAULTS.top_p, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Sampling only: keep the smallest set of tokens with this total probability.")),
                io.Int.Input("top_k", default=DEFAULTS.top_k, min=0, max=1000,
                             tooltip="Sampling only: keep the k most likely tokens; 0 = no limit."),
                io.Float.Input("repetition_penalty", default=DEFAULTS.repetition_penalty, min=1.0, max=3.0,
                               step=0.01, tooltip=(
                                   "Above 1 discourages repeating tokens (Qwen2.5-VL's release uses 1.05); 1 = off.")),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Sampling only: the same seed repeats the same answer."),
                io.Image.Input("images", optional=True, tooltip=(
                    "The image(s) to ask about; every image of the batch is shown to the model. Unconnected: a "
                    "text-only question.")),
                io.String.Input("system_prompt", optional=True, multiline=True, default="", tooltip=(
                    "Optional system prompt; empty uses Qwen2.5-VL's own default.")),
            ],
            outputs=[io.String.Output("text", tooltip=(
                "The answer. Show it with 'Preview as Text' or wire it into a prompt input."))],
        )

    @classmethod
    def execute(cls, model, preset: str, question: str, max_new_tokens: int, do_sample: bool,
                temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int,
                images=None, system_prompt: str = "") -> io.NodeOutput:
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        progress = bridge.Progress(max_new_tokens)
        reply = answer(
            model.pipeline,
            resolve_question(preset, question),
            images=images,  # the IMAGE batch as is: its frames are counted before any is converted
            system_prompt=system_prompt or None,
            settings=settings,
            callback=progress.token_callback,
            check_cancel=bridge.cancel_check(),
        )
        return io.NodeOutput(reply)


NODES = [TBACUnderstand]
