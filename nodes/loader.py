"""The loader node: a checkpoint folder (and optionally a trained adapter) -> ``TBAC_MODEL``."""
from __future__ import annotations

from pathlib import Path

from ..tbac_core.demo import DEMO_NAME
from ..tbac_core.devices import resolve_dtype
from ..tbac_core.errors import CheckpointError, ComponentNotFoundError
from ..tbac_core.loading import (
    apply_adapter,
    list_adapters,
    list_checkpoints,
    load_model,
    resolve_checkpoint,
)
from ..tbac_core.params import DTYPE_CHOICES, QUANTIZATION_FORMATS
from . import comfy_bridge as bridge
from .comfy_bridge import TBAC_MODEL, io

ROOT_CATEGORY = "TBAC-UniImage"
NO_ADAPTER = "none"
AS_STORED = "as stored"  # the weights input: no quantisation while loading
MODEL_TOOLTIP = "The TBAC-UniImage model from the 'TBAC-UniImage Loader' node."


# -- checkpoint and adapter folders ------------------------------------------------------------
def checkpoint_choices() -> list[str]:
    """Checkpoint folders under the ``tbac`` model folders, then the built-in demo model.

    A user folder named ``demo`` takes the name; the built-in model is then not offered.
    """
    names = list(list_checkpoints(bridge.model_roots()))
    return names if DEMO_NAME in names else names + [DEMO_NAME]


RELEASE_NAME = "TBAC-UniImage-3B"
RELEASE_SOURCE = "Hugging Face: TencentBAC/TBAC-UniImage-3B"


def missing_checkpoint_message(name: str, choices: list[str]) -> str:
    """What to do when a workflow names a checkpoint folder that is not installed."""
    roots = ", ".join(str(root) for root in bridge.model_roots()) or "(no models/tbac folder is configured)"
    found = ", ".join(choice for choice in choices if choice != DEMO_NAME) or "none"
    return (
        f"Checkpoint folder {name!r} is not installed. Looked in: {roots} (checkpoint folders found: {found}). "
        f"Download the {RELEASE_NAME} release folder ({RELEASE_SOURCE}) and put it, whole, in "
        f"models/tbac/{RELEASE_NAME}/ (config.json + model*.safetensors), then press R in the browser and pick it "
        f"in the loader; or pick '{DEMO_NAME}', the built-in toy model (32x32, 20 steps, guidance 3)."
    )


def demo_checkpoint() -> Path:
    try:  # the demo package is optional: a slim install may leave it out
        from ..tbac_core.demo import DEMO_CHECKPOINT
    except ImportError as exc:
        if not (exc.name or "").endswith("tbac_core.demo"):
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
    if name == DEMO_NAME and name not in list_checkpoints(roots):
        return demo_checkpoint()
    return resolve_checkpoint(name, roots)


def adapter_choices() -> dict[str, Path]:
    """Trained adapter folders under the ``tbac_adapters`` model folders, by relative name (first root wins)."""
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


def load_with_tokenizer_fallback(path: Path, **kwargs):
    """``load_model``; when the checkpoint brings no tokenizer, ComfyUI's bundled Qwen2.5 one.

    The core looks for the tokenizer before it reads any weight, so the first try is cheap.
    """
    try:
        return load_model(path, **kwargs)
    except ComponentNotFoundError:
        fallback = bridge.comfy_tokenizer_dir()
        if fallback is None:
            raise
    return load_model(path, tokenizer_dir=fallback, **kwargs)


# -- node ----------------------------------------------------------------------------------------
class TBACModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TBACModelLoader",
            display_name="TBAC-UniImage Loader",
            category=f"{ROOT_CATEGORY}/loaders",
            description=(
                "Loads a TBAC-UniImage checkpoint folder (config.json + safetensors) from models/tbac (or a 'tbac:' "
                "entry of extra_model_paths.yaml). Its MLLM, ladder DiT and DC-AE are handed to ComfyUI's memory "
                "manager. If the folder has no tokenizer, ComfyUI's bundled Qwen2.5 tokenizer is used."
            ),
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices(), tooltip=(
                    "A checkpoint folder under models/tbac (e.g. TBAC-UniImage-3B), or 'demo' for the small "
                    "built-in toy model that shows the pipeline working without a download.")),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=(
                    "Weight precision. auto: bf16 on GPUs that support it (else fp16), fp32 on the CPU. The "
                    "DC-AE never runs in fp16 (it overflows to black images).")),
                io.Combo.Input("device", options=list(bridge.DEVICE_CHOICES), default="auto", tooltip=(
                    "auto: ComfyUI's GPU, offloading parts to RAM when VRAM is short. cpu: run everything on "
                    "the CPU (slow). gpu: like auto, but fail if there is no GPU.")),
                io.Combo.Input("adapter", options=[NO_ADAPTER, *adapter_choices()], default=NO_ADAPTER, tooltip=(
                    "A trained ladder adapter folder from models/tbac_adapters to apply on top of the checkpoint, "
                    "or 'none'.")),
                # Optional: API-format workflows saved before this input existed still run unchanged.
                io.Combo.Input("weights", options=[AS_STORED, *QUANTIZATION_FORMATS], default=AS_STORED, optional=True,
                               tooltip=(
                    "Quantise the linear layers of the MLLM and the DiT while loading, to fit a smaller GPU: fp8 "
                    "and q8_0 halve them (q8_0 is near lossless), q5_k / q4_k shrink them further at a visible "
                    "cost. 'as stored' keeps the checkpoint's weights (an fp8 or GGUF folder loads as it is). "
                    "The VAE, norms and embeddings are never quantised.")),
            ],
            outputs=[TBAC_MODEL.Output("model", tooltip=(
                "The loaded model: wire it into the encode, sampler, decode and understand nodes."))],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str | None = None) -> bool | str:
        """ComfyUI's check of ``checkpoint`` (it replaces the bare "Value not in list" for this input).

        A template names TBAC-UniImage-3B; a user without it learns what to download and where to put it.
        """
        if checkpoint is None:  # linked from another node: checked when it runs
            return True
        choices = checkpoint_choices()
        return True if checkpoint in choices else missing_checkpoint_message(checkpoint, choices)

    @classmethod
    def execute(cls, checkpoint: str, dtype: str, device: str, adapter: str, weights: str = AS_STORED) -> io.NodeOutput:
        path = checkpoint_dir(checkpoint)
        adapter_path = None if adapter == NO_ADAPTER else adapter_dir(adapter)  # refuse bad names before loading
        devices = bridge.devices_for(device)
        model = load_with_tokenizer_fallback(
            path,
            dtype=resolve_dtype(dtype, devices.compute),  # for the compute device, not where it is read to
            device=devices.initial,
            models_dirs=bridge.model_roots(),
            name=checkpoint,
            quantization=None if weights == AS_STORED else weights,
        )
        name = checkpoint
        if adapter_path is not None:
            apply_adapter(model, adapter_path)
            name = f"{checkpoint} + {adapter}"
        return io.NodeOutput(bridge.ManagedModel(model, devices, name))
