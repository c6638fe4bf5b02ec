"""Generation nodes: ladder encode, sample, decode and encode an image with the DC-AE.

Each node translates ComfyUI values to one ``TBACPipeline`` call and back; the pipeline checks
its inputs before it loads a part. IMAGE is ``[B, H, W, C]`` float32 in 0..1 on the CPU; LATENT is
``{"samples": [B, C, H/f, W/f]}`` holding the DiT's latents, i.e. DC-AE latents already multiplied
by the VAE's scaling factor (f = 32 for TBAC-UniImage-3B, C = 32).
"""
from __future__ import annotations

from ..tbac_core import processing
from ..tbac_core.errors import InvalidParameterError
from ..tbac_core.ladder import LAYER_SPEC_SYNTAX
from ..tbac_core.params import (
    DEFAULT_IMAGE_SIZE,
    MAX_BATCH,
    MAX_CACHE_SKIPS,
    MAX_CACHE_THRESHOLD,
    MAX_GUIDANCE_UI,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    SAMPLERS,
    SIZE_STEP,
    SamplingParams,
)
from ..tbac_core.pipeline import composite_pixels
from . import comfy_bridge as bridge
from .comfy_bridge import LADDER_CONDITIONING, TBAC_MODEL, io
from .loader import MODEL_TOOLTIP, ROOT_CATEGORY

DEFAULTS = SamplingParams()
TILING_CHOICES = {"auto": None, "on": True, "off": False}  # choice -> the pipeline's ``tiled``


def model_input() -> io.Input:
    return TBAC_MODEL.Input("model", tooltip=MODEL_TOOLTIP)


def tbac_latents(model, latent: dict):
    """The tensor of a LATENT, refused when it cannot be TBAC latents of this model."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4:
        raise InvalidParameterError("Expected a LATENT holding a 'samples' tensor [B, C, h, w].")
    channels = model.model.latent_channels
    if samples.shape[1] != channels:
        raise InvalidParameterError(
            f"This LATENT has {samples.shape[1]} channels but {model.name!r} uses {channels}: it was made by "
            f"another model's VAE or sampler. Use 'TBAC Encode Image' / 'TBAC Sampler' latents."
        )
    return samples


class TBACLadderEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACLadderEncode",
            display_name="TBAC Ladder Encode",
            category=f"{ROOT_CATEGORY}/conditioning",
            description=(
                "Runs the MLLM on the prompt (and the input images when editing) and keeps the metaquery states of "
                "several MLLM layers ('rungs'): one rung feeds each DiT block. Also encodes the negative prompt and, "
                "for edits, the image-only branch used by image guidance."
            ),
            inputs=[
                model_input(),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "What to draw, or for an edit the instruction ('make the sky purple'). Can take a link from "
                    "any STRING output, e.g. the Understand node's caption. An empty prompt runs, with a warning "
                    "in ComfyUI's log (the console).")),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to steer away from; empty is the official default."),
                io.String.Input("layers", default="default", tooltip=(
                    "Which MLLM layers feed the DiT blocks: " + LAYER_SPEC_SYNTAX + ". If the spec names more or "
                    "fewer layers than the DiT has blocks, they are spread evenly over the blocks in order (first "
                    "block gets the first, last block the last).")),
                io.Boolean.Input("keep_all_rungs", default=False, tooltip=(
                    "Keep every MLLM layer in the conditioning, so the ladder nodes can remap layers later without "
                    "running the MLLM again (uses more memory and runs the full MLLM).")),
                io.Boolean.Input("one_prompt_per_line", default=False, tooltip=(
                    "Treat each non-blank line of the prompt box as its own prompt: one queue run renders them all "
                    "as a batch.")),
                io.Image.Input("images", optional=True, tooltip=(
                    "Input image(s) to edit. Every image of the batch is an input image of the prompt (of every "
                    "prompt, with one prompt per line). Leave unconnected for text-to-image.")),
            ],
            outputs=[LADDER_CONDITIONING.Output("conditioning", tooltip=(
                "Per-DiT-block conditioning (positive, negative and image-guidance branches)."))],
        )

    @classmethod
    def execute(cls, model, prompt: str, negative_prompt: str, layers: str, keep_all_rungs: bool,
                one_prompt_per_line: bool, images=None) -> io.NodeOutput:
        cond = model.pipeline.encode(
            processing.split_prompts(prompt, one_prompt_per_line),
            images=images,  # the IMAGE batch as is: its frames are counted before any is converted
            negative_prompt=negative_prompt,
            layers=layers,
            keep_all_rungs=keep_all_rungs,
            check_cancel=bridge.cancel_check(),
        )
        return io.NodeOutput(cond.to(device=bridge.intermediate_device()))


class TBACSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACSampler",
            display_name="TBAC Sampler",
            category=f"{ROOT_CATEGORY}/sampling",
            description=(
                "Denoises with the ladder DiT (flow DPM-Solver++ or Euler) under classifier-free guidance; edits use "
                "3-way image guidance. Outputs TBAC latents (DC-AE latents times its scaling factor); decode them "
                "with 'TBAC Decode'."
            ),
            inputs=[
                model_input(),
                LADDER_CONDITIONING.Input("conditioning", tooltip="From 'TBAC Ladder Encode' or a ladder node."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip=("Noise seed; the same seed gives the same image on every device (noise is "
                                      "drawn on the CPU).")),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=MAX_STEPS,
                             tooltip=f"Denoising steps (the official default is {DEFAULTS.steps})."),
                io.Float.Input("guidance", default=DEFAULTS.guidance_scale, min=0.0, max=MAX_GUIDANCE_UI, step=0.1,
                               tooltip="Text guidance scale (cfg); 1 disables guidance."),
                io.Float.Input("image_guidance", default=DEFAULTS.image_guidance_scale, min=0.0,
                               max=MAX_GUIDANCE_UI, step=0.1, tooltip=(
                                   "Edits only: how strongly to stay with the input images. Above 1 uses 3-way "
                                   "guidance (negative / images only / prompt); 1 or less compares prompt and "
                                   "negative prompt, both with the images. Ignored for text-to-image.")),
                io.Int.Input("width", default=DEFAULT_IMAGE_SIZE, min=SIZE_STEP, max=MAX_SIDE, step=SIZE_STEP,
                             tooltip=("Image width in pixels: a multiple of the model's latent factor (32 for "
                                      "TBAC-UniImage-3B; it was trained at 512). Ignored when a latent is connected.")),
                io.Int.Input("height", default=DEFAULT_IMAGE_SIZE, min=SIZE_STEP, max=MAX_SIDE, step=SIZE_STEP,
                             tooltip=("Image height in pixels: a multiple of the model's latent factor (32 for "
                                      "TBAC-UniImage-3B). Ignored when a latent is connected.")),
                io.Int.Input("batch_size", default=DEFAULTS.num_images_per_prompt, min=1, max=MAX_BATCH,
                             tooltip="Images per prompt (each with its own noise)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default=DEFAULTS.sampler, tooltip=(
                    "dpm++: flow DPM-Solver++ as the official pipeline. euler: flow-matching Euler.")),
                io.Float.Input("denoise", default=DEFAULTS.denoise, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Image-to-image only (a latent is connected): the share of the steps to run. Lower keeps more "
                    "of the input. Ignored without a latent.")),
                io.Latent.Input("latent", optional=True, tooltip=(
                    "Start from these TBAC latents (from 'TBAC Encode Image') instead of pure noise, for "
                    "image-to-image; sets the size. With a noise mask ('Set Latent Noise Mask') only the masked "
                    "region changes: inpainting, or with an edit conditioning an edit limited to the mask.")),
                # Opt-in accelerations, last so saved workflows keep their widget order; off = exact.
                io.Float.Input("cache_threshold", default=DEFAULTS.cache_threshold, min=0.0, max=MAX_CACHE_THRESHOLD,
                               step=0.01, optional=True, tooltip=(
                                   "Step caching (approximate, 0 = off): when the DiT's first block changed less than "
                                   "this since the last full step, the other blocks are skipped and their output "
                                   "change is extrapolated from the last two full steps. 0.1-0.2 saves about half "
                                   "of the blocks at a small image change; larger values change the picture more.")),
                io.Float.Input("guidance_cutoff", default=DEFAULTS.guidance_cutoff, min=0.0, max=1.0, step=0.05,
                               optional=True, tooltip=(
                                   "Guidance truncation (approximate, 1 = off): the negative (and image-only) branch "
                                   "runs only for this fraction of the steps, then the prompt alone (fewer DiT rows; "
                                   "measured: 0.9 already changes the picture visibly, see README).")),
                io.Int.Input("cache_max_skips", default=DEFAULTS.cache_max_skips, min=1, max=MAX_CACHE_SKIPS,
                             optional=True, tooltip=(
                                 "Step caching only: at most this many steps in a row skip the blocks before a "
                                 "full step runs again. Higher is faster and changes the picture more.")),
            ],
            outputs=[io.Latent.Output("latent", tooltip=(
                "TBAC latents, prompts x images per prompt, in prompt order (keeping the input's noise mask, as "
                "core samplers do, so 'TBAC Decode' can paste the untouched pixels back)."))],
        )

    @classmethod
    def execute(cls, model, conditioning, seed: int, steps: int, guidance: float, image_guidance: float,
                width: int, height: int, batch_size: int, sampler: str, denoise: float,
                latent=None, cache_threshold: float = DEFAULTS.cache_threshold,
                guidance_cutoff: float = DEFAULTS.guidance_cutoff,
                cache_max_skips: int = DEFAULTS.cache_max_skips) -> io.NodeOutput:
        init_latents = None if latent is None else tbac_latents(model, latent)
        noise_mask = None if latent is None else latent.get("noise_mask")
        params = SamplingParams(
            steps=steps,
            guidance_scale=guidance,
            image_guidance_scale=image_guidance,
            sampler=sampler,
            seed=seed,
            num_images_per_prompt=batch_size,
            denoise=denoise if init_latents is not None else 1.0,  # the widget is ignored without a latent
            cache_threshold=cache_threshold,
            cache_max_skips=cache_max_skips,
            guidance_cutoff=guidance_cutoff,
        )
        progress = bridge.Progress(steps, preview=cls.previewer(model))
        latents = model.pipeline.sample(
            conditioning,
            width=width,
            height=height,
            params=params,
            init_latents=init_latents,
            callback=progress.sampler_callback,
            check_cancel=bridge.cancel_check(),
            noise_mask=noise_mask,
        )
        out = {"samples": latents.to(bridge.intermediate_device())}
        if noise_mask is not None:
            out["noise_mask"] = noise_mask
        return io.NodeOutput(out)

    @staticmethod
    def previewer(model):
        """``(StepInfo, max_size) -> PIL image`` for the live preview, or None when previews are off."""
        if bridge.preview_max_size() is None:
            return None
        projection = model.preview_projection()
        scale = model.pipeline.vae_scale_factor
        steps = model.model.scheduler_config.get("num_train_timesteps", 1000)
        return lambda info, max_size: projection.step_preview(info, scale, max_size, steps)


class TBACDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACDecode",
            display_name="TBAC Decode (DC-AE)",
            category=f"{ROOT_CATEGORY}/latent",
            description="Decodes TBAC latents into images with the model's DC-AE.",
            inputs=[
                model_input(),
                io.Latent.Input("latent", tooltip="TBAC latents from 'TBAC Sampler' (or 'TBAC Encode Image')."),
                io.Combo.Input("tiling", options=list(TILING_CHOICES), default="auto",
                               tooltip="Decode tile by tile to bound memory. auto: only above 1024x1024 pixels."),
                io.Image.Input("original_images", optional=True, tooltip=(
                    "For inpainting / masked edits: the images that were encoded. Outside the LATENT's noise mask "
                    "their pixels are pasted back, so the untouched region is exactly the input.")),
            ],
            outputs=[io.Image.Output("images", tooltip=(
                "Images [B, H, W, C] in 0..1: wire into Save Image, Preview Image or any image node."))],
        )

    @classmethod
    def execute(cls, model, latent, tiling: str, original_images=None) -> io.NodeOutput:
        latents = tbac_latents(model, latent)
        cancel = bridge.cancel_check()
        if cancel is not None:  # decoding is one call: the last chance to stop before it
            cancel()
        images = model.pipeline.decode(latents, tiled=TILING_CHOICES[tiling])
        mask = latent.get("noise_mask")
        if original_images is not None and mask is not None:
            if original_images.shape[1:3] != images.shape[1:3]:  # 'TBAC Encode Image' cropped it: crop alike
                factor = model.pipeline.vae_scale_factor
                if mask.shape[-2:] == original_images.shape[1:3]:
                    mask = processing.crop_to_multiple(mask.reshape(-1, *mask.shape[-2:])[..., None], factor)[..., 0]
                original_images = processing.crop_to_multiple(original_images, factor)
            images = composite_pixels(images, original_images, mask)
        return io.NodeOutput(images)


class TBACEncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACEncodeImage",
            display_name="TBAC Encode Image (DC-AE)",
            category=f"{ROOT_CATEGORY}/latent",
            description=(
                "Encodes images into TBAC latents with the model's DC-AE, for image-to-image with 'TBAC Sampler' "
                "(connect its latent input and lower denoise)."
            ),
            inputs=[
                model_input(),
                io.Image.Input("images", tooltip="Images to encode (one size per batch)."),
                io.Boolean.Input("crop_to_multiple", default=True, tooltip=(
                    "Centre-crop each side down to a multiple of the latent factor (32 for TBAC-UniImage-3B). "
                    "Off: such sizes are refused with an error.")),
            ],
            outputs=[io.Latent.Output("latent", tooltip="TBAC latents of the images.")],
        )

    @classmethod
    def execute(cls, model, images, crop_to_multiple: bool) -> io.NodeOutput:
        if crop_to_multiple:
            images = processing.crop_to_multiple(images, model.pipeline.vae_scale_factor)
        latents = model.pipeline.encode_image(images)
        return io.NodeOutput({"samples": latents.to(bridge.intermediate_device())})


NODES = [TBACLadderEncode, TBACSampler, TBACDecode, TBACEncodeImage]
