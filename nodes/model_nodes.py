"""ComfyUI nodes for generation: load, ladder encode, sample, decode / encode with the DC-AE.

Each node translates ComfyUI types to one ``tbac_core`` call and back; the work is in the core.
Custom types: ``TBAC_MODEL`` (a ``comfy_bridge.ManagedModel``) and ``LADDER_CONDITIONING`` (a
``tbac_core.ladder.conditioning.LadderConditioning``). IMAGE is ``[B, H, W, C]`` float32 in 0..1 on the CPU;
LATENT is ``{"samples": [B, C, H/f, W/f]}`` holding the DiT's latents, i.e. DC-AE latents already
multiplied by the VAE's scaling factor (f = 32 for TBAC-UniImage-3B, C = 32).
"""
from __future__ import annotations

from pathlib import Path

from tbac_core.devices import resolve_dtype
from tbac_core.errors import (
    CheckpointError,
    ComponentNotFoundError,
    InvalidParameterError,
)
from tbac_core.ladder.layer_spec import LAYER_SPEC_SYNTAX, parse_layer_spec
from tbac_core.loading.build import find_tokenizer_dir, load_model
from tbac_core.loading.checkpoint import read_checkpoint_config
from tbac_core.loading.components import TBACConfig, resolve_component_dir, search_dirs
from tbac_core.loading.folders import list_checkpoints, resolve_checkpoint
from tbac_core.params import (
    MAX_BATCH,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    SAMPLERS,
    SamplingParams,
)
from tbac_core.processing import ui_inputs
from tbac_core.processing.images import to_pil_rgb

from . import comfy_bridge as bridge

ROOT_CATEGORY = "TBAC-UniImage"
DEMO_CHOICE = "demo"
NO_ADAPTER = "none"
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
TILING_CHOICES = ("auto", "on", "off")
SIZE_STEP = 32  # TBAC-UniImage-3B's latent factor; every model's factor divides it

MODEL_TOOLTIP = "The TBAC-UniImage model from the 'TBAC-UniImage Loader' node."


# -- checkpoint and adapter folders ------------------------------------------------------------
def checkpoint_choices() -> list[str]:
    """Checkpoint folders under the ``tbac`` model folders, then the built-in demo model.

    A user folder named ``demo`` takes the name; the built-in model is then not offered.
    """
    names = list(list_checkpoints(bridge.model_roots()))
    return names if DEMO_CHOICE in names else names + [DEMO_CHOICE]


def demo_checkpoint() -> Path:
    try:
        from tbac_core.demo import DEMO_CHECKPOINT
    except ImportError as exc:  # no demo package, or one without its checkpoint constant
        if exc.name != "tbac_core.demo":
            raise
        raise CheckpointError(
            "The built-in demo model is not part of this installation (tbac_core/demo is missing). "
            "Choose a checkpoint folder from models/tbac, or reinstall the pack."
        ) from exc
    if not (Path(DEMO_CHECKPOINT) / "config.json").is_file():
        raise CheckpointError(
            f"The built-in demo model is not built: no config.json in {DEMO_CHECKPOINT}. Build it with "
            f"'python -m tbac_core.demo.build', or choose a checkpoint folder from models/tbac."
        )
    return Path(DEMO_CHECKPOINT)


def checkpoint_dir(name: str) -> Path:
    """The folder of a checkpoint choice; names are only looked up, never joined onto paths."""
    roots = bridge.model_roots()
    if name == DEMO_CHOICE and name not in list_checkpoints(roots):
        return demo_checkpoint()
    return resolve_checkpoint(name, roots)


def adapter_choices() -> dict[str, Path]:
    """Trained adapter folders under the ``tbac_adapters`` model folders, by relative name (first root wins)."""
    from tbac_core.loading.adapters import list_adapters

    found: dict[str, Path] = {}
    for root in bridge.adapter_roots():
        for name in list_adapters(root):
            found.setdefault(name, root / name)
    return found


def adapter_dir(name: str) -> Path:
    """The folder of an adapter choice; like checkpoints, names are only looked up among listed ones."""
    available = adapter_choices()
    if name not in available:
        raise CheckpointError(
            f"Adapter {name!r} is not among the adapters in "
            f"{', '.join(map(str, bridge.adapter_roots())) or '(no adapter folder)'}. Available: "
            f"{', '.join(available) or '(none found)'}. Put trained adapter folders (adapter_config.json + "
            f"adapter_model.safetensors) in models/tbac_adapters."
        )
    return available[name]


def core_finds_tokenizer(checkpoint: Path, models_dirs: list[Path]) -> bool:
    """Whether ``load_model`` finds a tokenizer by itself (checkpoint or MLLM folder)."""
    config = TBACConfig.from_dict(read_checkpoint_config(checkpoint))
    mllm_dir = resolve_component_dir(config.mllm_id, checkpoint, "config.json", search_dirs(models_dirs))
    try:
        find_tokenizer_dir([checkpoint, mllm_dir])
    except ComponentNotFoundError:
        return False
    return True


# -- nodes -------------------------------------------------------------------------------------
class TBACModelLoader:
    DESCRIPTION = (
        "Loads a TBAC-UniImage checkpoint folder (config.json + safetensors) from models/tbac (or a 'tbac:' "
        "entry of extra_model_paths.yaml). Its MLLM, ladder DiT and DC-AE are handed to ComfyUI's memory "
        "manager. If the folder has no tokenizer, ComfyUI's bundled Qwen2.5 tokenizer is used."
    )
    CATEGORY = f"{ROOT_CATEGORY}/loaders"
    RETURN_TYPES = ("TBAC_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model: wire it into the encode, sampler, decode and understand nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        adapters = [NO_ADAPTER] + list(adapter_choices())
        return {
            "required": {
                "checkpoint": (checkpoint_choices(), {
                    "tooltip": "A checkpoint folder under models/tbac (e.g. TBAC-UniImage-3B), or 'demo' for the "
                               "small built-in toy model that shows the pipeline working without a download.",
                }),
                "dtype": (list(DTYPE_CHOICES), {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: bf16 on GPUs that support it (else fp16), fp32 on the "
                               "CPU. The DC-AE never runs in fp16 (it overflows to black images).",
                }),
                "device": (list(bridge.DEVICE_CHOICES), {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's GPU, offloading parts to RAM when VRAM is short. cpu: run "
                               "everything on the CPU (slow). gpu: like auto, but fail if there is no GPU.",
                }),
                "adapter": (adapters, {
                    "default": NO_ADAPTER,
                    "tooltip": "A trained ladder adapter folder from models/tbac_adapters to apply on top of "
                               "the checkpoint, or 'none'.",
                }),
            }
        }

    def load(self, checkpoint: str, dtype: str, device: str, adapter: str):
        path = checkpoint_dir(checkpoint)
        adapter_path = None if adapter == NO_ADAPTER else adapter_dir(adapter)  # refuse bad names before loading
        devices = bridge.devices_for(device)
        roots = bridge.model_roots()
        fallback = bridge.comfy_tokenizer_dir()
        tokenizer_dir = fallback if fallback is not None and not core_finds_tokenizer(path, roots) else None
        model = load_model(
            path,
            dtype=resolve_dtype(dtype, devices.compute),
            device=devices.initial,
            tokenizer_dir=tokenizer_dir,
            models_dirs=roots,
            name=checkpoint,
        )
        name = checkpoint
        if adapter_path is not None:
            from tbac_core.loading.adapters import apply_adapter

            apply_adapter(model, adapter_path)
            name = f"{checkpoint} + {adapter}"
        return (bridge.ManagedModel(model, devices, name),)


class TBACLadderEncode:
    DESCRIPTION = (
        "Runs the MLLM on the prompt (and the input images when editing) and keeps the metaquery states of "
        "several MLLM layers ('rungs'): one rung feeds each DiT block. Also encodes the negative prompt and, "
        "for edits, the image-only branch used by image guidance."
    )
    CATEGORY = f"{ROOT_CATEGORY}/conditioning"
    RETURN_TYPES = ("LADDER_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Per-DiT-block conditioning (positive, negative and image-guidance branches).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TBAC_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "prompt": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "What to draw, or for an edit the instruction ('make the sky purple'). Can take a "
                               "link from any STRING output, e.g. the Understand node's caption.",
                }),
                "negative_prompt": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "What to steer away from; empty is the official default.",
                }),
                "layers": ("STRING", {
                    "default": "default",
                    "tooltip": "Which MLLM layers feed the DiT blocks: " + LAYER_SPEC_SYNTAX + ". If the spec "
                               "names more or fewer layers than the DiT has blocks, they are spread evenly over "
                               "the blocks in order (first block gets the first, last block the last).",
                }),
                "keep_all_rungs": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep every MLLM layer in the conditioning, so the ladder nodes can remap layers "
                               "later without running the MLLM again (uses more memory and runs the full MLLM).",
                }),
                "one_prompt_per_line": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Treat each non-blank line of the prompt box as its own prompt: one queue run "
                               "renders them all as a batch.",
                }),
            },
            "optional": {
                "images": ("IMAGE", {
                    "tooltip": "Input image(s) to edit. Every image of the batch is an input image of the prompt "
                               "(of every prompt, with one prompt per line). Leave unconnected for text-to-image.",
                }),
            },
        }

    def encode(self, model, prompt: str, negative_prompt: str, layers: str, keep_all_rungs: bool,
               one_prompt_per_line: bool, images=None):
        prompts = ui_inputs.split_prompts(prompt, one_prompt_per_line)
        identity = model.identity
        parse_layer_spec(layers, identity.num_rungs, identity.num_dit_blocks)  # refuse a bad spec before any work
        inputs = None if images is None else [to_pil_rgb(image) for image in images]
        model.prepare("mllm")
        cond = model.pipeline.encode(
            prompts,
            images=inputs,
            negative_prompt=negative_prompt,
            layers=layers,
            keep_all_rungs=keep_all_rungs,
            check_cancel=bridge.cancel_check(),
        )
        return (cond.to(device=bridge.intermediate_device()),)


class TBACSampler:
    DESCRIPTION = (
        "Denoises with the ladder DiT (flow DPM-Solver++ or Euler) under classifier-free guidance; edits use "
        "3-way image guidance. Outputs TBAC latents (DC-AE latents times its scaling factor); decode them with "
        "'TBAC Decode'."
    )
    CATEGORY = f"{ROOT_CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("TBAC latents, prompts x images per prompt, in prompt order.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TBAC_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "conditioning": ("LADDER_CONDITIONING", {"tooltip": "From 'TBAC Ladder Encode' or a ladder node."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed; the same seed gives the same image on every device (noise is drawn "
                               "on the CPU).",
                }),
                "steps": ("INT", {"default": 30, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Denoising steps (the official default is 30)."}),
                "guidance": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "Text guidance scale (cfg); 1 disables guidance."}),
                "image_guidance": ("FLOAT", {
                    "default": 1.5, "min": 0.0, "max": 30.0, "step": 0.1,
                    "tooltip": "Edits only: how strongly to stay with the input images. Above 1 uses 3-way "
                               "guidance (negative / images only / prompt); 1 or less compares prompt and "
                               "negative prompt, both with the images. Ignored for text-to-image.",
                }),
                "width": ("INT", {
                    "default": 512, "min": SIZE_STEP, "max": MAX_SIDE, "step": SIZE_STEP,
                    "tooltip": "Image width in pixels: a multiple of the model's latent factor (32 for "
                               "TBAC-UniImage-3B; it was trained at 512). Ignored when a latent is connected.",
                }),
                "height": ("INT", {
                    "default": 512, "min": SIZE_STEP, "max": MAX_SIDE, "step": SIZE_STEP,
                    "tooltip": "Image height in pixels: a multiple of the model's latent factor (32 for "
                               "TBAC-UniImage-3B). Ignored when a latent is connected.",
                }),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH,
                                       "tooltip": "Images per prompt (each with its own noise)."}),
                "sampler": (list(SAMPLERS), {
                    "default": SAMPLERS[0],
                    "tooltip": "dpm++: flow DPM-Solver++ as the official pipeline. euler: flow-matching Euler.",
                }),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Image-to-image only (a latent is connected): the share of the steps to run. "
                               "Lower keeps more of the input. Ignored without a latent.",
                }),
            },
            "optional": {
                "latent": ("LATENT", {
                    "tooltip": "Start from these TBAC latents (from 'TBAC Encode Image') instead of pure noise, "
                               "for image-to-image; sets the size.",
                }),
            },
        }

    def sample(self, model, conditioning, seed: int, steps: int, guidance: float, image_guidance: float,
               width: int, height: int, batch_size: int, sampler: str, denoise: float, latent=None):
        init_latents = None if latent is None else tbac_latents(model, latent)
        params = SamplingParams(
            steps=steps,
            guidance_scale=guidance,
            image_guidance_scale=image_guidance,
            sampler=sampler,
            seed=seed,
            num_images_per_prompt=batch_size,
            denoise=denoise if init_latents is not None else 1.0,
        )
        params.validate()
        if init_latents is None:
            model.pipeline.resolve_size(width, height)  # refuse a bad size before loading the DiT
        model.prepare("dit")
        progress = bridge.Progress(steps)
        latents = model.pipeline.sample(
            conditioning,
            width=width,
            height=height,
            params=params,
            init_latents=init_latents,
            callback=progress.sampler_callback,
            check_cancel=bridge.cancel_check(),
        )
        return ({"samples": latents.to(bridge.intermediate_device())},)


class TBACDecode:
    DESCRIPTION = "Decodes TBAC latents into images with the model's DC-AE."
    CATEGORY = f"{ROOT_CATEGORY}/latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Images [B, H, W, C] in 0..1: wire into Save Image, Preview Image or any image node.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TBAC_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "latent": ("LATENT", {"tooltip": "TBAC latents from 'TBAC Sampler' (or 'TBAC Encode Image')."}),
                "tiling": (list(TILING_CHOICES), {
                    "default": "auto",
                    "tooltip": "Decode tile by tile to bound memory. auto: only above 1024x1024 pixels.",
                }),
            }
        }

    def decode(self, model, latent, tiling: str):
        latents = tbac_latents(model, latent)
        cancel = bridge.cancel_check()
        if cancel is not None:
            cancel()
        model.prepare("vae")
        tiled = {"auto": None, "on": True, "off": False}[tiling]
        return (model.pipeline.decode(latents, tiled=tiled),)


class TBACEncodeImage:
    DESCRIPTION = (
        "Encodes images into TBAC latents with the model's DC-AE, for image-to-image with 'TBAC Sampler' "
        "(connect its latent input and lower denoise)."
    )
    CATEGORY = f"{ROOT_CATEGORY}/latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("TBAC latents of the images.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TBAC_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": "Images to encode (one size per batch)."}),
                "crop_to_multiple": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Centre-crop each side down to a multiple of the latent factor (32 for "
                               "TBAC-UniImage-3B). Off: such sizes are refused with an error.",
                }),
            }
        }

    def encode(self, model, images, crop_to_multiple: bool):
        if crop_to_multiple:
            images = ui_inputs.crop_to_multiple(images, model.model.vae_scale_factor)
        model.prepare("vae")
        latents = model.pipeline.encode_image(images)
        return ({"samples": latents.to(bridge.intermediate_device())},)


def tbac_latents(model, latent: dict):
    """The tensor of a LATENT, refused when it cannot be TBAC latents of this model."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4:
        raise InvalidParameterError("Expected a LATENT holding a 'samples' tensor [B, C, h, w].")
    if "noise_mask" in latent:
        raise InvalidParameterError(
            "This LATENT carries a noise mask (inpainting), which TBAC-UniImage sampling does not support; "
            "remove the 'Set Latent Noise Mask' node."
        )
    channels = model.model.latent_channels
    if samples.shape[1] != channels:
        raise InvalidParameterError(
            f"This LATENT has {samples.shape[1]} channels but {model.name!r} uses {channels}: it was made by "
            f"another model's VAE or sampler. Use 'TBAC Encode Image' / 'TBAC Sampler' latents."
        )
    return samples


NODE_CLASS_MAPPINGS = {
    "TBACModelLoader": TBACModelLoader,
    "TBACLadderEncode": TBACLadderEncode,
    "TBACSampler": TBACSampler,
    "TBACDecode": TBACDecode,
    "TBACEncodeImage": TBACEncodeImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TBACModelLoader": "TBAC-UniImage Loader",
    "TBACLadderEncode": "TBAC Ladder Encode",
    "TBACSampler": "TBAC Sampler",
    "TBACDecode": "TBAC Decode (DC-AE)",
    "TBACEncodeImage": "TBAC Encode Image (DC-AE)",
}
