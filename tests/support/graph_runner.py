"""A small, test-only executor of ComfyUI workflows, and a reader of ComfyUI's UI (graph) format.

Tests use it to run the pack's API-format workflows end to end without ComfyUI: links
``[node_id, output_index]`` are resolved, inputs are validated the way ComfyUI validates a prompt
(required inputs present, combo values listed, numbers in range, link types matching), our nodes
run for real, and the core nodes the workflows use are stood in by the doubles below, which
declare the same inputs as ComfyUI v0.24 and record what they receive. Node classes may use the
classic API or the V3 schema: both are read through ``INPUT_TYPES()`` / ``RETURN_TYPES`` (a V3 node's
are converted from its schema, as ComfyUI does), and a V3 node's ``NodeOutput`` is unpacked as
ComfyUI's executor does.

Like ComfyUI, only output nodes and what they depend on are executed, and outputs of non-output
nodes are cached across runs by class and inputs (so a loader with unchanged widgets runs once).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from comfy_api.v0_0_2 import io as comfy_io
from PIL import Image

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
ANY = "*"
# Widgets the ComfyUI front end adds after an input's own widget, with the value they store in a
# UI workflow: the seed's "control after generate" and LoadImage's upload button.
CONTROL_AFTER_GENERATE = "control_after_generate"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_WIDGET = "upload"


class WorkflowError(AssertionError):
    """A workflow ComfyUI would refuse (or that our doubles cannot run)."""


# ``comfy_io``: the comfy_api double in tests, the real one when comfy_workflows.py runs in ComfyUI.


# -- model folder ------------------------------------------------------------------------------
def make_models_root(root: Path, fixture_root: Path) -> Path:
    """A ``models/tbac`` folder as a user fills it, made of links into the tiny fixture.

    ``tbac-tiny`` is the checkpoint folder; its component folders sit next to it, where the core
    looks for them (the checkpoint's config names them by relative id).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "tbac-tiny").symlink_to(fixture_root / "checkpoint", target_is_directory=True)
    for component in ("tiny-Qwen2.5-VL-Instruct", "tiny-Sana_diffusers"):
        (root / component).symlink_to(fixture_root / component, target_is_directory=True)
    return root


# -- declared inputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # a type name, or "COMBO" for a list of choices
    options: dict
    required: bool
    choices: tuple = ()

    @property
    def is_widget(self) -> bool:
        """Whether the front end shows a widget (a value stored in the node) for this input."""
        return (self.type == "COMBO" or self.type in WIDGET_TYPES) and not self.options.get("forceInput", False)

    def frontend_widgets(self) -> list[str]:
        """Names of the widget values this input stores in a UI workflow, in order."""
        if not self.is_widget:
            return []
        names = [self.name]
        if self.options.get(CONTROL_AFTER_GENERATE):
            names.append(CONTROL_AFTER_GENERATE)
        if self.options.get("image_upload"):
            names.append(UPLOAD_WIDGET)
        return names


def input_specs(node_class) -> list[InputSpec]:
    """Required then optional inputs of a node class, in declaration order.

    A combo is ``([choices], options)`` in the classic API and ``("COMBO", {"options": [choices]})``
    in a V3 node's converted description.
    """
    declared = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, entry in declared.get(section, {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 else {}
            if isinstance(kind, (list, tuple)):
                specs.append(InputSpec(name, "COMBO", options, section == "required", tuple(kind)))
            elif kind == "COMBO":
                specs.append(InputSpec(name, "COMBO", options, section == "required", tuple(options["options"])))
            else:
                specs.append(InputSpec(name, kind, options, section == "required"))
    return specs


def output_types(node_class) -> tuple[str, ...]:
    return tuple(node_class.RETURN_TYPES)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def types_match(output_type: str, input_type: str) -> bool:
    return ANY in (output_type, input_type) or output_type == input_type


# -- core node doubles -------------------------------------------------------------------------
@dataclass
class Recorder:
    """What the output doubles received, per node id."""

    images: dict = field(default_factory=dict)  # node id -> IMAGE tensor
    texts: dict = field(default_factory=dict)  # node id -> str


def make_core_doubles(input_dir: Path, recorder: Recorder) -> dict:
    """Stand-ins for the ComfyUI core nodes our workflows use (same inputs and outputs)."""

    class LoadImage:
        @classmethod
        def INPUT_TYPES(cls):
            files = sorted(p.name for p in Path(input_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".webp"))
            return {"required": {"image": (files, {"image_upload": True})}}

        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"

        def load_image(self, image):
            pil = Image.open(Path(input_dir) / image)
            rgb = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
            if "A" in pil.getbands():
                mask = 1.0 - np.asarray(pil.getchannel("A"), dtype=np.float32) / 255.0
            else:
                mask = np.zeros((64, 64), dtype=np.float32)  # what ComfyUI returns without alpha
            return torch.from_numpy(rgb)[None], torch.from_numpy(mask)[None]

    class _ImageOutput:
        RETURN_TYPES = ()
        FUNCTION = "save_images"
        OUTPUT_NODE = True

        def save_images(self, images, filename_prefix="ComfyUI", node_id=None):
            _check_image(images)
            recorder.images[node_id] = images
            return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png"} for i in range(len(images))]}}

    class SaveImage(_ImageOutput):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    class PreviewImage(_ImageOutput):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE", {})},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    class PreviewAny:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"source": (ANY, {})}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "main"
        OUTPUT_NODE = True

        def main(self, source=None, node_id=None):
            value = source if isinstance(source, str) else json.dumps(source)
            recorder.texts[node_id] = value
            return {"ui": {"text": (value,)}, "result": (value,)}

    class SetLatentNoiseMask:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT", {}), "mask": ("MASK", {})}}

        RETURN_TYPES = ("LATENT",)
        FUNCTION = "set_mask"

        def set_mask(self, samples, mask):
            return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)

    return {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage, "PreviewAny": PreviewAny,
            "SetLatentNoiseMask": SetLatentNoiseMask, **core_sampling_doubles()}


# Core sampling: what ComfyUI v0.24 lists (comfy.samplers.KSampler.SAMPLERS / SCHEDULERS).
CORE_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
CORE_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")
# Nodes whose values only mean something inside a real ComfyUI (a native MODEL, a core VAE): workflows
# using them are validated here and run by ``comfy_workflows.py`` in a real ComfyUI.
NEEDS_REAL_COMFYUI = ("KSampler", "EmptyLatentImage", "VAEDecode", "TBACNativeModel", "TBACNativeVAE")


def core_sampling_doubles() -> dict:
    """KSampler, Empty Latent Image and VAE Decode as ComfyUI v0.24 declares them; running one is refused."""

    class _DeclaredOnly:
        FUNCTION = "run"

        def run(self, **inputs):
            raise WorkflowError(f"{type(self).__name__} runs only in a real ComfyUI (tests/support/comfy_workflows.py).")

    class KSampler(_DeclaredOnly):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                "model": ("MODEL", {}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (list(CORE_SAMPLERS), {}),
                "scheduler": (list(CORE_SCHEDULERS), {}),
                "positive": ("CONDITIONING", {}),
                "negative": ("CONDITIONING", {}),
                "latent_image": ("LATENT", {}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }}

        RETURN_TYPES = ("LATENT",)

    class EmptyLatentImage(_DeclaredOnly):
        @classmethod
        def INPUT_TYPES(cls):
            size = {"default": 512, "min": 16, "max": 16384, "step": 8}
            return {"required": {"width": ("INT", size), "height": ("INT", size),
                                 "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

        RETURN_TYPES = ("LATENT",)

    class VAEDecode(_DeclaredOnly):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}

        RETURN_TYPES = ("IMAGE",)

    return {"KSampler": KSampler, "EmptyLatentImage": EmptyLatentImage, "VAEDecode": VAEDecode}


def _check_image(images) -> None:
    """What ComfyUI's image nodes expect: [B, H, W, 3] float32 in 0..1 on the CPU."""
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == 3):
        raise WorkflowError(f"IMAGE must be a [B, H, W, 3] tensor, got {getattr(images, 'shape', type(images))}.")
    if images.dtype != torch.float32 or images.device.type != "cpu":
        raise WorkflowError(f"IMAGE must be float32 on the CPU, got {images.dtype} on {images.device}.")
    if images.min() < 0 or images.max() > 1:
        raise WorkflowError("IMAGE values must lie in 0..1.")


# -- running -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    outputs: dict  # node id -> tuple of outputs (executed nodes only)
    ui: dict  # node id -> "ui" dict of output nodes
    executed: list  # node ids in execution order (cache hits included)


class GraphRunner:
    """Validates and runs API-format workflows with ``node_classes`` (ours plus doubles)."""

    def __init__(self, node_classes: dict):
        self.node_classes = dict(node_classes)
        self.cache: dict = {}  # (class, inputs key) -> outputs, for non-output nodes

    # validation, as ComfyUI's validate_prompt does it (the parts that matter here)
    def validate(self, workflow: dict) -> None:
        if not workflow:
            raise WorkflowError("Empty workflow.")
        for node_id, node in workflow.items():
            class_type = node.get("class_type")
            if class_type not in self.node_classes:
                raise WorkflowError(f"Node {node_id}: unknown class_type {class_type!r}.")
            cls = self.node_classes[class_type]
            specs = {spec.name: spec for spec in input_specs(cls)}
            inputs = node.get("inputs", {})
            unknown = set(inputs) - set(specs)
            if unknown:
                raise WorkflowError(f"Node {node_id} ({class_type}): unknown inputs {sorted(unknown)}.")
            for name, spec in specs.items():
                if name not in inputs:
                    if spec.required:
                        raise WorkflowError(f"Node {node_id} ({class_type}): required input {name!r} missing.")
                    continue
                value = inputs[name]
                if is_link(value):
                    self._check_link(workflow, node_id, spec, value)
                elif not spec.is_widget:
                    raise WorkflowError(f"Node {node_id} ({class_type}): input {name!r} ({spec.type}) needs a link.")
                else:
                    _check_value(node_id, class_type, spec, value)
        if not any(getattr(self.node_classes[n["class_type"]], "OUTPUT_NODE", False) for n in workflow.values()):
            raise WorkflowError("The workflow has no output node, so ComfyUI would run nothing.")

    def _check_link(self, workflow, node_id, spec: InputSpec, link) -> None:
        source_id, index = link
        if source_id not in workflow:
            raise WorkflowError(f"Node {node_id}: input {spec.name!r} links to missing node {source_id}.")
        types = output_types(self.node_classes[workflow[source_id]["class_type"]])
        if not 0 <= index < len(types):
            raise WorkflowError(f"Node {node_id}: input {spec.name!r} links to output {index} of node {source_id}, "
                                f"which has {len(types)} outputs.")
        expected = "STRING" if spec.type == "COMBO" else spec.type
        if not types_match(types[index], expected):
            raise WorkflowError(
                f"Node {node_id}: input {spec.name!r} ({spec.type}) is linked to a {types[index]} output."
            )

    def run(self, workflow: dict) -> RunResult:
        self.validate(workflow)
        result = RunResult({}, {}, [])
        keys: dict = {}
        for node_id, node in workflow.items():
            if getattr(self.node_classes[node["class_type"]], "OUTPUT_NODE", False):
                self._execute(workflow, node_id, result, keys, stack=())
        return result

    def _execute(self, workflow, node_id, result: RunResult, keys: dict, stack: tuple):
        if node_id in result.outputs:
            return result.outputs[node_id]
        if node_id in stack:
            raise WorkflowError(f"Cycle through node {node_id}.")
        node = workflow[node_id]
        cls = self.node_classes[node["class_type"]]
        kwargs, key_parts = {}, []
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                upstream = self._execute(workflow, value[0], result, keys, stack + (node_id,))
                kwargs[name] = upstream[value[1]]
                key_parts.append((name, keys[value[0]], value[1]))
            else:
                kwargs[name] = value
                key_parts.append((name, json.dumps(value)))
        key = (node["class_type"], tuple(sorted(key_parts, key=str)))
        keys[node_id] = key
        is_output = getattr(cls, "OUTPUT_NODE", False)
        if not is_output and key in self.cache:
            outputs = self.cache[key]
        else:
            instance = cls()
            if node["class_type"] in ("SaveImage", "PreviewImage", "PreviewAny"):
                kwargs["node_id"] = node_id
            returned = getattr(instance, cls.FUNCTION)(**kwargs)
            if isinstance(returned, comfy_io.NodeOutput):  # a V3 node
                if returned.ui is not None:
                    result.ui[node_id] = returned.ui
                returned = returned.args
            elif isinstance(returned, dict):
                if "ui" in returned:
                    result.ui[node_id] = returned["ui"]
                returned = returned.get("result", ())
            outputs = tuple(returned)
            if len(outputs) != len(cls.RETURN_TYPES):
                raise WorkflowError(
                    f"Node {node_id} returned {len(outputs)} values for {len(cls.RETURN_TYPES)} outputs."
                )
            if not is_output:
                self.cache[key] = outputs
        result.outputs[node_id] = outputs
        result.executed.append(node_id)
        return outputs


def _check_value(node_id, class_type, spec: InputSpec, value) -> None:
    where = f"Node {node_id} ({class_type}) input {spec.name!r}"
    if spec.type == "COMBO":
        if value not in spec.choices:
            raise WorkflowError(f"{where}: value {value!r} not in list {list(spec.choices)}.")
        return
    if spec.type == "BOOLEAN":
        if not isinstance(value, bool):
            raise WorkflowError(f"{where}: expected a boolean, got {value!r}.")
        return
    if spec.type == "STRING":
        if not isinstance(value, str):
            raise WorkflowError(f"{where}: expected a string, got {value!r}.")
        return
    number_types = (int,) if spec.type == "INT" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types):
        raise WorkflowError(f"{where}: expected {spec.type}, got {value!r}.")
    if "min" in spec.options and value < spec.options["min"]:
        raise WorkflowError(f"{where}: {value} is below the minimum {spec.options['min']}.")
    if "max" in spec.options and value > spec.options["max"]:
        raise WorkflowError(f"{where}: {value} is above the maximum {spec.options['max']}.")


# -- UI (graph) format -------------------------------------------------------------------------
FRONTEND_ONLY_NODES = {
    # Nodes that exist only in the front end: never sent to the server, absent from API format.
    "Note": ["text"],
    "MarkdownNote": ["text"],
}
# Widgets the front end adds to core nodes beyond their declared inputs (value count per node),
# as saved by frontend 1.45 (the one ComfyUI v0.24 pins): PreviewAny keeps three display values.
FRONTEND_EXTRA_VALUES = {"PreviewAny": 3}


def widget_names(node_class) -> list[str]:
    """The widget values a UI workflow stores for a node, in order."""
    names: list[str] = []
    for spec in input_specs(node_class):
        names += spec.frontend_widgets()
    return names


def ui_to_api(graph: dict, node_classes: dict) -> dict:
    """The API-format prompt the front end would queue for a UI-format workflow."""
    links = {link[0]: link for link in graph["links"]}
    api = {}
    for node in graph["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        cls = node_classes[node["type"]]
        values = list(node.get("widgets_values") or [])
        names = widget_names(cls)
        linked = {entry["name"]: links[entry["link"]]
                  for entry in node.get("inputs", []) if entry.get("link") is not None}
        inputs = {}
        by_name = dict(zip(names, values))
        for spec in input_specs(cls):
            if spec.name in linked:
                link = linked[spec.name]
                inputs[spec.name] = [str(link[1]), link[2]]
            elif spec.is_widget:
                inputs[spec.name] = by_name[spec.name]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
