"""TBAC in ComfyUI's own sampling: a native MODEL for core KSampler, core CONDITIONING, flow sigmas.

``TBAC Native Model`` wraps the ladder DiT as a ComfyUI ``BaseModel`` with flow-matching model
sampling (``CONST`` + ``ModelSamplingDiscreteFlow`` with the checkpoint's ``flow_shift``), so core
KSampler / KSamplerAdvanced / SamplerCustomAdvanced, their samplers, schedulers, CFG nodes and
noise masks drive it. ``TBAC To Conditioning`` turns a ladder conditioning into core CONDITIONING:
the per-block DiT conditions (connector + caption projection already applied) are laid side by side
along the token axis, ``[B, blocks * N, D]``, which the native model splits back per block. The
latent format carries the projection fitted for live previews, so core previews work too.

Reaching our sampler's results natively: ``TBAC Flow Sigmas`` gives the exact schedule of our
Euler sampler (core Euler + these sigmas = our Euler); the 3-way edit guidance
``u + ig·(ui − u) + g·(c − ui)`` is core ``DualCFGGuider`` (style regular) with cond1 = positive,
cond2 = image_only, negative = negative, cfg_conds = g, cfg_cond2_negative = ig.

``TBAC Native VAE`` gives the DC-AE as a core ``VAE`` for core VAE Decode / VAE Encode and their tiled
variants: LATENTs stay TBAC latents (scaled by the DC-AE's factor), so they mix freely with 'TBAC Encode
Image' / 'TBAC Decode' and with the native model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..tbac_core.errors import InvalidParameterError
from ..tbac_core.modeling import ConditionKVCache, decode_signed, encode_signed, mask_to_bias
from ..tbac_core.params import MAX_STEPS, SAMPLERS, SamplingParams
from ..tbac_core.pipeline import make_scheduler
from . import comfy_bridge as bridge
from .comfy_bridge import LADDER_CONDITIONING, io
from .generate import model_input
from .loader import ROOT_CATEGORY

DEFAULTS = SamplingParams()
logger = logging.getLogger(__name__)
# transformer_options key of the sampling run's ConditionKVCache (and of its sampling wrapper).
CONDITION_KV_KEY = "tbac_condition_kv"
CATEGORY = f"{ROOT_CATEGORY}/native"
# ComfyUI's Latent2RGB previews map -1..1 to 0..255; our projection gives 0..1.
PREVIEW_RANGE_SCALE, PREVIEW_RANGE_SHIFT = 2.0, -1.0


def _require_comfyui(what: str) -> None:
    if not bridge.IN_COMFYUI:
        raise InvalidParameterError(f"{what} makes a ComfyUI model value and only runs inside ComfyUI.")


class TBACLatentFormat(bridge.NativeLatentFormat):
    """TBAC latents as they travel in LATENT: already multiplied by the DC-AE's scaling factor."""

    def __init__(self, channels: int, vae_scale: int, projection):
        self.scale_factor = 1.0
        self.shift_factor = 0.0
        self.latent_channels = channels
        self.latent_dimensions = 2
        self.spacial_downscale_ratio = vae_scale
        self.taesd_decoder_name = None
        # The fitted projection, in core's layout: one row of 3 factors per channel, and a bias.
        self.latent_rgb_factors = (projection.weight.T * PREVIEW_RANGE_SCALE).tolist()
        self.latent_rgb_factors_bias = (projection.bias * PREVIEW_RANGE_SCALE + PREVIEW_RANGE_SHIFT).tolist()
        self.latent_rgb_factors_reshape = None


@dataclass
class NativeModelConfig:
    """The part of a ComfyUI model config that ``BaseModel`` reads (no weights to build: we bring ours)."""

    latent_format: TBACLatentFormat
    sampling_settings: dict  # {"shift": flow_shift, "multiplier": num_train_timesteps}
    unet_config: dict = field(default_factory=lambda: {"disable_unet_model_creation": True})
    manual_cast_dtype: torch.dtype | None = None
    custom_operations: object = None
    optimizations: dict = field(default_factory=dict)
    memory_usage_factor: float = 2.0
    supported_inference_dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)


class LadderDiTDiffusionModel(torch.nn.Module):
    """The ladder DiT with core's ``diffusion_model`` call: ``(x, t, context=[B, blocks*N, D], ...)``.

    Runs through the ``DIFFUSION_MODEL`` wrappers patched onto the MODEL, as core's own models do, so
    core EasyCache works on it. Core samplers hand over the raw conditions at every step; within a
    sampling run the blocks' cross-attention keys/values come from the run's ``ConditionKVCache``
    (put in place by ``native_model``'s sampling wrapper), keyed by core's per-condition uuids.
    """

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, attention_mask=None,
                **unused):
        transformer_options = transformer_options if transformer_options is not None else {}
        return bridge.run_diffusion_model_wrappers(
            self._forward, self, transformer_options, x, timesteps, context, attention_mask, transformer_options)

    def _forward(self, x, timesteps, context, attention_mask, transformer_options):
        context = context.to(self.dit.dtype)  # [B, blocks*N, D]
        if attention_mask is None:
            attention_mask = torch.ones(context.shape[0], context.shape[1] // self.dit.num_blocks, device=x.device)
        bias = mask_to_bias(attention_mask.to(x.device), self.dit.dtype)  # [B, 1, N]
        kv_cache = transformer_options.get(CONDITION_KV_KEY)
        groups = transformer_options.get("uuids") or []
        if kv_cache is not None and groups and context.shape[0] % len(groups) == 0:
            conditions = kv_cache.block_kv(self.dit, context, bias, groups)
        else:  # no sampling run to keep them for: this step's keys/values
            conditions = self.dit.precompute_conditions(list(context.chunk(self.dit.num_blocks, dim=1)), bias)
        return self.dit(x, timesteps.to(x.device), conditions)


def condition_kv_sampling_wrapper(executor, *args, **kwargs):
    """Core's ``OUTER_SAMPLE`` wrapper: one ``ConditionKVCache`` for the sampling run, dropped after it.

    Core's guider runs this on its own copy of the model options and restores the original when
    sampling ends, so the cache (the conditions' keys/values, memory on the compute device) is freed
    with the run.
    """
    guider = executor.class_obj
    cache = ConditionKVCache()
    guider.model_options.setdefault("transformer_options", {})[CONDITION_KV_KEY] = cache
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options["transformer_options"].pop(CONDITION_KV_KEY, None)
        logger.debug("TBAC native model: cross-attention keys/values computed for %d condition batches, "
                     "reused %d times", cache.computed, cache.reused)


class TBACNativeDiT(bridge.NativeBaseModel):
    """ComfyUI ``BaseModel`` of the ladder DiT: flow matching (the DiT predicts the velocity)."""

    def __init__(self, dit, config: NativeModelConfig, device=None):
        super().__init__(config, bridge.FLOW_MODEL_TYPE, device=device)
        self.diffusion_model = LadderDiTDiffusionModel(dit)

    def extra_conds(self, **kwargs):
        out = {"c_crossattn": bridge.cross_attention_cond(kwargs["cross_attn"])}
        if kwargs.get("attention_mask") is not None:
            out["attention_mask"] = bridge.regular_cond(kwargs["attention_mask"])
        return out


def native_model(model):
    """The ComfyUI MODEL (a ModelPatcher) of a ``ManagedModel``'s ladder DiT."""
    tbac = model.model
    config = NativeModelConfig(
        latent_format=TBACLatentFormat(tbac.latent_channels, tbac.vae_scale_factor, model.preview_projection()),
        sampling_settings={"shift": tbac.scheduler_config.get("flow_shift", 3.0),
                           "multiplier": tbac.scheduler_config.get("num_train_timesteps", 1000)},
    )
    patcher = bridge.model_patcher(TBACNativeDiT(tbac.dit, config, device=model.devices.offload["dit"]), model.devices)
    bridge.add_sampling_wrapper(patcher, CONDITION_KV_KEY, condition_kv_sampling_wrapper)
    return patcher


def core_conditioning(model, cond, branch: str, repeats: int = 1) -> list:
    """One branch of a ladder conditioning as core CONDITIONING ``[[context [B, blocks*N, D], extras]]``."""
    with model.pipeline.placement.use("dit") as dit:
        blocks = cond.block_conditions(branch, dit.embed_condition)  # num_blocks x [B, N, D]
    context = torch.cat(blocks, dim=1).float().repeat_interleave(repeats, dim=0).to(bridge.intermediate_device())
    extras = {}
    if cond.attention_mask is not None:
        extras["attention_mask"] = cond.attention_mask.repeat_interleave(repeats, dim=0)
    return [[context, extras]]


class TBACNativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACNativeModel",
            display_name="TBAC Native Model",
            category=CATEGORY,
            description=(
                "The ladder DiT as a ComfyUI MODEL with flow-matching sampling (the checkpoint's shift), for core "
                "KSampler, KSamplerAdvanced and SamplerCustomAdvanced. Condition it with 'TBAC To Conditioning'; "
                "its latents are TBAC latents (decode with 'TBAC Decode'). Core EasyCache / LazyCache work on it."
            ),
            inputs=[model_input()],
            outputs=[io.Model.Output("MODEL", tooltip="For core samplers, with 'TBAC To Conditioning'.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        _require_comfyui("TBAC Native Model")
        return io.NodeOutput(native_model(model))


class TBACToConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACToConditioning",
            display_name="TBAC To Conditioning",
            category=CATEGORY,
            description=(
                "Turns a ladder conditioning into core CONDITIONING for the native model: positive, negative and, "
                "for edits, image_only (negative prompt with the input images). Text-to-image and 2-way edits: "
                "KSampler with positive + negative (edits: image_only as negative). 3-way edit guidance: "
                "DualCFGGuider with cond1 = positive, cond2 = image_only, negative = negative, cfg_conds = guidance, "
                "cfg_cond2_negative = image guidance, style regular."
            ),
            inputs=[
                model_input(),
                LADDER_CONDITIONING.Input("conditioning", tooltip="From 'TBAC Ladder Encode' or a ladder node."),
                io.Int.Input("batch_size", default=DEFAULTS.num_images_per_prompt, min=1, max=64, tooltip=(
                    "Images per prompt: repeats each prompt's conditioning to match a latent batch of "
                    "prompts x batch_size (e.g. Empty Latent Image's batch).")),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="The prompt (with the input images when editing)."),
                io.Conditioning.Output("negative", tooltip="The negative prompt (with black images when editing)."),
                io.Conditioning.Output("image_only", tooltip=(
                    "Edits: the negative prompt with the real input images (text-to-image: same as negative).")),
            ],
        )

    @classmethod
    def execute(cls, model, conditioning, batch_size: int) -> io.NodeOutput:
        conditioning.check_model(model.identity)
        positive = core_conditioning(model, conditioning, "positive", batch_size)
        negative = core_conditioning(model, conditioning, "negative", batch_size)
        image_only = (core_conditioning(model, conditioning, "image_negative", batch_size)
                      if conditioning.has_image_guidance else negative)
        return io.NodeOutput(positive, negative, image_only)


class TBACFlowSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACFlowSigmas",
            display_name="TBAC Flow Sigmas",
            category=CATEGORY,
            description=(
                "The noise schedule our 'TBAC Sampler' uses (the checkpoint's flow shift), as SIGMAS for "
                "SamplerCustom / SamplerCustomAdvanced: core euler with these sigmas is our euler sampler."
            ),
            inputs=[
                model_input(),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=MAX_STEPS, tooltip="Denoising steps."),
                io.Combo.Input("schedule", options=list(SAMPLERS), default="euler", tooltip=(
                    "Whose schedule: euler (FlowMatchEulerDiscreteScheduler) or dpm++ (the official "
                    "DPM-Solver++ flow sigmas).")),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Keep only the last share of the steps, as 'TBAC Sampler' does for image-to-image.")),
            ],
            outputs=[io.Sigmas.Output("SIGMAS", tooltip="steps + 1 sigmas from 1 down to 0.")],
        )

    @classmethod
    def execute(cls, model, steps: int, schedule: str, denoise: float) -> io.NodeOutput:
        return io.NodeOutput(flow_sigmas(model.model.scheduler_config, schedule, steps, denoise))


def flow_sigmas(scheduler_config: dict, schedule: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Our sampler's sigmas [steps' + 1] (float32, CPU), the last share ``denoise`` of them."""
    scheduler = make_scheduler(schedule, scheduler_config)
    scheduler.set_timesteps(steps, device="cpu")
    sigmas = scheduler.sigmas.float().cpu()
    start = steps - int(round(steps * denoise))
    return sigmas[start:]


# -- the DC-AE as a core VAE --------------------------------------------------------------------
# ComfyUI sizes its VAE work (batch splitting, what to free first) from a per-image estimate of the
# activation memory. Core's AutoencoderKL estimate is 2178 elements per decoded pixel and 1767 per
# encoded pixel for 128 full-resolution channels, about 17 and 14 per full-resolution channel; the
# DC-AE is a conv/attention autoencoder of the same build, so we scale by its own first block width.
DECODE_ELEMENTS_PER_PIXEL_CHANNEL = 17
ENCODE_ELEMENTS_PER_PIXEL_CHANNEL = 14


class DCAEFirstStage(torch.nn.Module):
    """The DC-AE in core's ``first_stage_model`` convention: TBAC latents <-> pixels in -1..1, [B, C, H, W]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, 3, h*f, w*f]
        return decode_signed(self.vae, latents)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C, H/f, W/f]
        return encode_signed(self.vae, pixels)


class TBACComfyVAE(bridge.NativeVAE):
    """Core ``comfy.sd.VAE`` around a loaded model's DC-AE (core's decode, encode and tiled code run on it).

    ``comfy.sd.VAE.__init__`` builds a VAE from a state dict it recognises; here the weights are
    already loaded, so this sets what its methods read: the first-stage module, the patcher (the
    placement's, which owns the DC-AE in ComfyUI's memory manager), ratios, channels, dtypes, the
    pixel range conversions and the memory estimates.
    """

    def __init__(self, model):
        tbac = model.model
        config = tbac.vae.config
        factor = tbac.vae_scale_factor
        self.first_stage_model = DCAEFirstStage(tbac.vae).eval()
        self.patcher = bridge.vae_patcher(model)
        self.device = model.devices.compute
        self.vae_dtype = next(tbac.vae.parameters()).dtype  # as loaded: bf16 / fp32, never fp16
        self.output_device = bridge.intermediate_device()
        self.latent_channels = tbac.latent_channels
        self.latent_dim = 2
        self.downscale_ratio = self.upscale_ratio = factor
        self.downscale_index_formula = self.upscale_index_formula = None
        self.output_channels = 3
        self.pad_channel_value = None
        self.extra_1d_channel = None
        self.crop_input = True  # centre-crop to multiples of f, as 'TBAC Encode Image' does
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = True  # plain torch layers: loaded whole, like the placement loads it
        self.not_video = False
        self.size = None
        decode_width = config.decoder_block_out_channels[0] * DECODE_ELEMENTS_PER_PIXEL_CHANNEL
        encode_width = config.encoder_block_out_channels[0] * ENCODE_ELEMENTS_PER_PIXEL_CHANNEL
        # shape: latents [B, C, h, w] / pixels [B, 3, H, W]; per image, as core counts.
        self.memory_used_decode = lambda shape, dtype: (
            decode_width * shape[2] * shape[3] * factor * factor * bridge.dtype_size(dtype))
        self.memory_used_encode = lambda shape, dtype: encode_width * shape[2] * shape[3] * bridge.dtype_size(dtype)

    @staticmethod
    def process_input(image: torch.Tensor) -> torch.Tensor:
        return image * 2.0 - 1.0  # IMAGE 0..1 -> the DC-AE's -1..1

    @staticmethod
    def process_output(image: torch.Tensor) -> torch.Tensor:
        return image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)  # in place: core's decode ignores the result


def native_vae(model) -> TBACComfyVAE:
    return TBACComfyVAE(model)


class TBACNativeVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACNativeVAE",
            display_name="TBAC Native VAE",
            category=CATEGORY,
            description=(
                "The model's DC-AE as a ComfyUI VAE, for core VAE Decode, VAE Encode and their tiled variants. "
                "Its LATENTs are TBAC latents, the same as 'TBAC Encode Image' / 'TBAC Sampler' give."
            ),
            inputs=[model_input()],
            outputs=[io.Vae.Output("VAE", tooltip="For core VAE Decode / VAE Encode (and the tiled ones).")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        _require_comfyui("TBAC Native VAE")
        return io.NodeOutput(native_vae(model))


NODES = [TBACNativeModel, TBACToConditioning, TBACFlowSigmas, TBACNativeVAE]
