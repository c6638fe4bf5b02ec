"""Everything the node pack takes from ComfyUI, in one module, with plain-torch fallbacks.

This is the only module of the pack that imports ComfyUI: its node API ``comfy_api`` at the pinned
version ``v0_0_2`` (the V3 schema: ``io.ComfyNode``, ``io.Schema``, ``ComfyExtension``), and
``comfy.*`` / ``folder_paths``. Inside a running ComfyUI the latter are already imported when custom
nodes load, so we use them; anywhere else (tests, scripts) the same functions fall back to plain
torch devices, folders from environment variables, no progress bar and no interrupt check.
Importing ``comfy.*`` ourselves is avoided on purpose: outside a server it initialises CUDA and
reads ComfyUI's command line.

Inside ComfyUI:
* model folders ``tbac`` (checkpoints) and ``tbac_adapters`` are registered with ``folder_paths``:
  ``models/tbac/`` and ``models/tbac_adapters/`` by default, plus any ``tbac:`` / ``tbac_adapters:``
  entries of ``extra_model_paths.yaml`` (ComfyUI registers those keys before packs load; we append);
* ``ComfyPlacement`` is the pipeline's placement: the MLLM, the ladder DiT and the DC-AE are each
  wrapped in a ``ModelPatcher`` and ``use(part)`` asks ``load_models_gpu`` for that part, so ComfyUI
  offloads the others when VRAM is short, loads a part partially when it does not fit (its layers
  then move their weights per call) and "Unload models" frees them. Nodes just call the
  pipeline; the pipeline loads each part when it runs it, after checking its inputs;
* progress goes to ``comfy.utils.ProgressBar`` and cancellation is
  ``throw_exception_if_processing_interrupted`` (its exception is a BaseException: never caught).

Outside ComfyUI: ``$TBAC_MODELS_DIR`` / ``$TBAC_ADAPTERS_DIR`` (``os.pathsep``-separated) list the
model folders, ``$TBAC_OUTPUT_DIR`` (default ``./output``) is the output folder, and the placement
yields each part where it already is.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from comfy_api.v0_0_2 import ComfyExtension, io

IN_COMFYUI = "comfy.model_management" in sys.modules and "folder_paths" in sys.modules
if IN_COMFYUI:
    import comfy.cli_args
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sd
    import comfy.utils
    import folder_paths

from ..tbac_core.devices import resolve_device
from ..tbac_core.errors import InvalidParameterError
from ..tbac_core.loading import MODELS_DIR_ENV
from ..tbac_core.modeling import (
    PATCH_FUNCTIONS,
    make_layers_offloadable,
    offloadable_layers,
    place_resident,
)
from ..tbac_core.pipeline import PARTS, PreviewProjections, TBACPipeline

__all__ = [
    "ComfyExtension", "io", "TBAC_MODEL", "LADDER_CONDITIONING", "IN_COMFYUI", "MODELS_DIR_ENV",
    "ADAPTERS_DIR_ENV", "OUTPUT_DIR_ENV", "DEVICE_CHOICES", "model_roots", "adapter_roots",
    "output_directory", "comfy_tokenizer_dir", "Devices", "devices_for", "intermediate_device",
    "ComfyPlacement", "ManagedModel", "offloadable_patcher", "prepare_partial_loading", "after_comfy_load",
    "Progress", "cancel_check", "preview_max_size", "PREVIEW_FORMAT",
    "NativeBaseModel", "NativeLatentFormat", "FLOW_MODEL_TYPE", "model_patcher", "cross_attention_cond",
    "regular_cond", "NativeVAE", "vae_patcher", "dtype_size", "run_diffusion_model_wrappers",
    "add_sampling_wrapper",
]

logger = logging.getLogger(__name__)

MODEL_FOLDER = "tbac"
ADAPTER_FOLDER = "tbac_adapters"
ADAPTERS_DIR_ENV = "TBAC_ADAPTERS_DIR"
OUTPUT_DIR_ENV = "TBAC_OUTPUT_DIR"
DEVICE_CHOICES = ("auto", "cpu", "gpu")

# The pack's own socket types: a loaded model (``ManagedModel``) and a ladder conditioning
# (``tbac_core.LadderConditioning``). Values are in-process objects; links between other types are
# refused by ComfyUI.
TBAC_MODEL = io.Custom("TBAC_MODEL")
LADDER_CONDITIONING = io.Custom("LADDER_CONDITIONING")


# -- folders ---------------------------------------------------------------------------------
def register_model_folders() -> None:
    """Make ``models/tbac`` and ``models/tbac_adapters`` known to ComfyUI (idempotent)."""
    if not IN_COMFYUI:
        return
    for name in (MODEL_FOLDER, ADAPTER_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default)
        try:  # so that a newcomer finds where to put models; a read-only install is fine too
            os.makedirs(default, exist_ok=True)
        except OSError:
            pass


def _env_dirs(variable: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(variable, "").split(os.pathsep) if p]


def model_roots() -> list[Path]:
    """Folders that hold TBAC-UniImage checkpoint folders (and their component folders)."""
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]
    return _env_dirs(MODELS_DIR_ENV)


def adapter_roots() -> list[Path]:
    """Folders that hold trained ladder adapters."""
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(ADAPTER_FOLDER)]
    return _env_dirs(ADAPTERS_DIR_ENV)


def output_directory() -> Path:
    """ComfyUI's output folder (``$TBAC_OUTPUT_DIR`` or ``./output`` outside ComfyUI)."""
    if IN_COMFYUI:
        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get(OUTPUT_DIR_ENV, "output"))


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)."""
    if not IN_COMFYUI:
        return None
    # ``comfy`` is a namespace package (no __file__); locate it through one of its modules.
    folder = Path(comfy.model_management.__file__).parent / "text_encoders" / "qwen25_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


# -- devices ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Devices:
    """Where the parts run (``compute``) and where each rests when ComfyUI offloads it."""

    compute: torch.device
    offload: dict  # part -> torch.device

    @property
    def initial(self) -> torch.device:
        """Where the checkpoint is read to: the common resting place, else the CPU."""
        places = set(self.offload.values())
        return places.pop() if len(places) == 1 else torch.device("cpu")


def devices_for(choice: str) -> Devices:
    """Devices for the loader's ``device`` choice: auto / cpu / gpu."""
    if choice not in DEVICE_CHOICES:
        raise InvalidParameterError(f"Unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    cpu = torch.device("cpu")
    if choice == "cpu":
        return Devices(cpu, {part: cpu for part in PARTS})
    if IN_COMFYUI:
        mm = comfy.model_management
        compute = mm.get_torch_device()
        offload = {"mllm": mm.text_encoder_offload_device(), "dit": mm.unet_offload_device(),
                   "vae": mm.vae_offload_device()}
    else:
        # Without a memory manager every part stays where it runs.
        compute = resolve_device("auto")
        offload = {part: compute for part in PARTS}
    if choice == "gpu" and compute.type == "cpu":
        raise InvalidParameterError(
            "device 'gpu' was chosen but no GPU is available"
            + (" to ComfyUI (was it started with --cpu?)" if IN_COMFYUI else "")
            + "; choose 'auto' or 'cpu'."
        )
    return Devices(compute, offload)


def intermediate_device() -> torch.device:
    """Where IMAGE / LATENT / conditioning tensors live between nodes (ComfyUI: usually the CPU)."""
    if IN_COMFYUI:
        return comfy.model_management.intermediate_device()
    return torch.device("cpu")


# -- memory management -----------------------------------------------------------------------
class TBACPart(torch.nn.Module):
    """A plain module around one part, for ``ModelPatcher``.

    ModelPatcher records the current device by assigning ``module.device``; transformers and
    diffusers models (and LadderDiT) expose ``device`` as a read-only property, so the patcher
    manages this holder instead. Moving the holder moves the part in place.
    """

    def __init__(self, part: torch.nn.Module):
        super().__init__()
        self.part = part


COMFY_CAST_FLAG = "comfy_cast_weights"  # ComfyUI's mark of a layer it may leave offloaded (comfy.ops)


def prepare_partial_loading(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Make ``module``'s layers offloadable and mark them for ComfyUI's memory manager (idempotent).

    ``ModelPatcher.load(lowvram_model_memory=...)`` moves a marked layer to the GPU while the budget
    lasts and otherwise leaves it on the offload device with ``comfy_cast_weights = True``; the
    layer then moves its weights per call (``tbac_core.modeling.layer_offload``). An unmarked
    layer that does not fit would be left behind with nothing to move its weights.
    ComfyUI reads ``weight`` and ``bias`` of every marked layer (as comfy.ops layers have them), so a
    layer without a bias (``nn.Embedding``, Qwen's RMSNorm) gets ``bias = None``; and it hands over
    per-call weight patches in the layer's ``weight_function`` / ``bias_function`` lists, which
    every layer gets empty (the layer applies them: ``layer_offload``).
    """
    layers = make_layers_offloadable(module)
    for layer in layers:
        if not hasattr(layer, COMFY_CAST_FLAG):
            setattr(layer, COMFY_CAST_FLAG, False)
        for name in ("weight", "bias"):
            if not hasattr(layer, name):
                setattr(layer, name, None)
        for name in PATCH_FUNCTIONS.values():  # ComfyUI extends these for a loaded layer's weight wrappers
            if not hasattr(layer, name):
                setattr(layer, name, [])
    return layers


def after_comfy_load(module: torch.nn.Module, patcher, device_to=None, *unused) -> None:
    """ComfyUI's ON_LOAD callback: follow its per-layer decisions, put the resident tensors on the device.

    ComfyUI moves only layers; the tensors owned by other modules (and the first layer, which
    frameworks read the model's device from) are placed here, after every (partial) load.
    """
    for layer in offloadable_layers(module):
        layer.weights_offloaded = bool(getattr(layer, COMFY_CAST_FLAG))
    place_resident(module, device_to if device_to is not None else patcher.load_device)


def offloadable_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """A ``ModelPatcher`` around ``module`` that ComfyUI may load fully or partly."""
    prepare_partial_loading(module)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, functools.partial(after_comfy_load, module))
    return patcher


class ComfyPlacement:
    """The pipeline's placement inside ComfyUI: each part is a ``ModelPatcher`` ComfyUI loads on use.

    ComfyUI's memory manager decides how much of a part goes to the GPU: all of it when it fits,
    else as many layers as its budget allows (``--lowvram``, ``--novram``, ``--reserve-vram`` and
    its automatic mode), the other layers moving their weights per call. Outside ComfyUI every part
    already sits on its compute device and ``use`` only yields it.
    """

    def __init__(self, model, devices: Devices):
        self.model = model
        self._patchers = {}
        if IN_COMFYUI:
            self._patchers = {
                part: offloadable_patcher(TBACPart(getattr(model, part)), devices.compute, devices.offload[part])
                for part in PARTS
            }

    @contextmanager
    def use(self, part: str):
        if part not in PARTS:
            raise ValueError(f"Unknown model parts {[part]}; parts are {PARTS}.")
        if self._patchers:
            comfy.model_management.load_models_gpu([self._patchers[part]])
        yield getattr(self.model, part)


class ManagedModel:
    """The ``TBAC_MODEL`` value: a loaded ``TBACModel``, its name, and the pipeline that runs it.

    ``pipeline`` is a ``TBACPipeline`` with the ComfyUI placement and no conditioning cache
    (ComfyUI's output cache already reuses unchanged encodes).
    """

    def __init__(self, model, devices: Devices, name: str):
        self.model = model
        self.name = name
        self.devices = devices
        self.pipeline = TBACPipeline(model, placement=ComfyPlacement(model, devices), cache_size=0)
        self._previews = PreviewProjections()

    def preview_projection(self):
        """The latent -> RGB projection for live previews, fitted from the DC-AE on first use."""
        with self.pipeline.placement.use("vae"):
            return self._previews.get(self.model)

    @property
    def identity(self):
        return self.model.identity

    def __repr__(self) -> str:
        return f"ManagedModel({self.name!r}, compute={self.devices.compute})"


# -- native models (what core KSampler drives) -----------------------------------------------
# Base classes for ``nodes/native.py``; outside ComfyUI plain stand-ins, so the module imports
# everywhere (its nodes then refuse to run: a native MODEL only means something inside ComfyUI).
NativeBaseModel = comfy.model_base.BaseModel if IN_COMFYUI else torch.nn.Module
NativeLatentFormat = comfy.latent_formats.LatentFormat if IN_COMFYUI else object
FLOW_MODEL_TYPE = comfy.model_base.ModelType.FLOW if IN_COMFYUI else None


def model_patcher(model: torch.nn.Module, devices: Devices):
    """A ``ModelPatcher`` (ComfyUI's MODEL value) around a native model."""
    return offloadable_patcher(model, devices.compute, devices.offload["dit"])


def run_diffusion_model_wrappers(forward: Callable, module: torch.nn.Module, transformer_options: dict, *args):
    """``forward(*args)`` through the ``DIFFUSION_MODEL`` wrappers on the MODEL (core EasyCache's), as core's
    models call themselves; ``args`` ends with ``transformer_options``, where those wrappers look for it."""
    if not IN_COMFYUI:
        return forward(*args)
    extension = comfy.patcher_extension
    wrappers = extension.get_all_wrappers(extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
    return extension.WrapperExecutor.new_class_executor(forward, module, wrappers).execute(*args)


def add_sampling_wrapper(patcher, key: str, wrapper: Callable) -> None:
    """Run ``wrapper(executor, ...)`` around each sampling run of ``patcher`` (core's ``OUTER_SAMPLE``)."""
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


def cross_attention_cond(tensor: torch.Tensor):
    """A conditioning input that core batches as cross-attention context ([B, N, D])."""
    return comfy.conds.CONDCrossAttn(tensor)


def regular_cond(tensor: torch.Tensor):
    """A conditioning input that core batches along dim 0."""
    return comfy.conds.CONDRegular(tensor)


# -- the DC-AE as a core VAE (what core VAE Decode / Encode and their tiled variants take) -------
# ``comfy.sd.VAE`` is built from a state dict it recognises; ``nodes/native.py`` subclasses it and sets
# the attributes its methods read instead (outside ComfyUI a plain stand-in: its node refuses to run).
NativeVAE = comfy.sd.VAE if IN_COMFYUI else object


def vae_patcher(model: ManagedModel):
    """The ``ModelPatcher`` that owns the DC-AE's weights in ComfyUI's memory manager (the placement's).

    A core VAE around the DC-AE must load through this one patcher: a second patcher of the same
    weights would let ComfyUI offload them behind the first one's back.
    """
    return model.pipeline.placement._patchers["vae"]


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (ComfyUI's own count inside ComfyUI)."""
    if IN_COMFYUI:
        return comfy.model_management.dtype_size(dtype)
    return torch.empty((), dtype=dtype).element_size()


# -- progress, previews and cancellation -----------------------------------------------------
PREVIEW_FORMAT = "JPEG"  # what ComfyUI's own latent previews send
PREVIEW_SIZE_OUTSIDE_COMFYUI = 512  # ComfyUI's default --preview-size


def preview_max_size() -> int | None:
    """The longest preview side, or None when the user turned previews off (``--preview-method none``)."""
    if IN_COMFYUI:
        args = comfy.cli_args.args
        if args.preview_method == comfy.cli_args.LatentPreviewMethod.NoPreviews:
            return None
        return args.preview_size
    return PREVIEW_SIZE_OUTSIDE_COMFYUI


def progress_bar(total: int):
    """ComfyUI's progress bar (``update_absolute(value, total, preview)``), or None outside ComfyUI."""
    return comfy.utils.ProgressBar(total) if IN_COMFYUI else None


class Progress:
    """The progress bar of one node run (ComfyUI's bar inside ComfyUI, nothing elsewhere).

    ``preview``: ``StepInfo -> PIL image`` for live previews (None: progress only). A preview goes to
    the bar as ComfyUI's ``(format, image, max_size)`` tuple, as its own samplers send them.
    """

    def __init__(self, total: int, preview: Callable | None = None):
        self._bar = progress_bar(total)
        self._preview = preview if self._bar is not None else None
        self._max_size = preview_max_size()

    def update(self, done: int, total: int, preview=None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(done, total, preview)

    def sampler_callback(self, info) -> None:
        """``callback`` for ``TBACPipeline.sample``: one tick (and preview) per denoising step."""
        preview = None
        if self._preview is not None and self._max_size is not None:
            preview = (PREVIEW_FORMAT, self._preview(info, self._max_size), self._max_size)
        self.update(info.index + 1, info.total, preview)

    def token_callback(self, done_tokens: int, max_tokens: int) -> None:
        """``callback`` for understanding: one tick per generated token."""
        self.update(done_tokens, max_tokens)


def cancel_check() -> Callable[[], None] | None:
    """The ``check_cancel`` to hand to the core: raises ComfyUI's interrupt when Cancel was pressed."""
    if IN_COMFYUI:
        return comfy.model_management.throw_exception_if_processing_interrupted
    return None


register_model_folders()
