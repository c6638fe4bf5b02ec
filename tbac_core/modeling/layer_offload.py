"""Layers whose weights may rest off the compute device: each call runs on copies moved to the input's device.

This is what lets a part run with only some of its weights on the GPU (ComfyUI's "partial loading",
``--lowvram``): a memory manager leaves some layers' weights in CPU memory and every call of such a
layer moves them to the device of its input for that call only, then drops the copies. The result
is the same as with the weights on the device (the same values, the same ops); only the transfers
cost time. fp8 and GGUF layers move their 1-byte / block-quantised weights and dequantise on the
device, so a streamed quantised layer costs its stored bytes in transfer, not its 16-bit size.

``make_layers_offloadable(part)`` turns every *layer* of a part into an offloadable one in place:

* a layer is a module that holds state-dict tensors of its own (parameters, persistent buffers:
  ``nn.Linear``, convolutions, ``nn.Embedding``, norms with weights, ``FP8Linear``, ``GGUFLinear``)
  and whose children hold none -- the unit a memory manager moves;
* its class becomes a subclass of its own class (same name, ``isinstance`` unchanged, same
  state-dict keys) whose ``forward`` moves the layer's tensors to the input's device whenever any of
  them is elsewhere, or whenever its ``weights_offloaded`` flag says its placement keeps them off
  the device.

A memory manager that streams a layer may also attach per-call patches to its weights (ComfyUI's
``weight_function`` / ``bias_function``: how a LoRA reaches a layer its partial load left
offloaded); the moved copies get them, in order, and the stored weights never change.

Fast paths that compute a layer's op from its weights instead of calling it (a 1x1 convolution as
``F.linear``) recognise a layer by ``built_class`` and read its weights inside ``tensors_on``, so
they hold for offloadable layers too.

Everything else is *resident*: it must sit on the compute device while the part runs, and
``place_resident`` puts it there (a few KB to a few MB: tensors owned by non-layer modules, such as
SANA's ``scale_shift_table``s, buffers of modules without weights, such as rotary ``inv_freq``,
and the layer holding the part's first parameter). That first layer stays resident on purpose:
transformers and diffusers report a model's ``device`` as its first parameter's, and generation
moves its inputs there.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..errors import InvalidParameterError


class OffloadableLayer:
    """Mixin placed in front of a layer's own class by ``make_layers_offloadable``."""

    weights_offloaded = False  # set per layer by the placement that keeps its weights elsewhere

    def forward(self, *args, **kwargs):
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else _input_device(args, kwargs)
        if device is not None and _must_move(self, device):
            with _tensors_moved(self, device):
                return super().forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


def built_class(layer: torch.nn.Module) -> type:
    """The class ``layer`` was built as: ``make_layers_offloadable`` puts a subclass of it in its place.

    For fast paths that compute a layer's op from its tensors instead of calling it (a 1x1
    convolution as ``F.linear``): ``built_class(conv) is nn.Conv2d`` holds for a plain convolution,
    offloadable or not, and not for anything wrapping one (a LoRA layer), which must run as itself.
    """
    return getattr(type(layer), "offloadable_form_of", type(layer))


@contextmanager
def tensors_on(layer: torch.nn.Module, device: torch.device):
    """While the block runs, ``layer``'s own tensors are on ``device``, as its forward would see them.

    An offloadable layer whose weights rest elsewhere gets copies for the block (as its forward
    does); any other layer is left as it is. Fast paths that read a layer's weights directly run
    inside this, so they work where a memory manager streams the layer.
    """
    if isinstance(layer, OffloadableLayer) and _must_move(layer, device):
        with _tensors_moved(layer, device):
            yield
    else:
        yield


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when it is there); host-to-accelerator copies are asynchronous."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and device.type != "cpu")


def _input_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _own_tensors(module: torch.nn.Module) -> dict[str, dict]:
    return {"_parameters": module._parameters, "_buffers": module._buffers}


def _must_move(layer: "OffloadableLayer", device: torch.device) -> bool:
    return layer.weights_offloaded or _has_patches(layer) or _held_elsewhere(layer, device)


def _has_patches(layer: torch.nn.Module) -> bool:
    # A loaded layer may carry per-call patches too (ComfyUI's weight wrappers); its own layers then
    # take the casting path whatever their flag says, and so does this one.
    return any(_patch_functions(layer, name) for name in PATCH_FUNCTIONS)


def _patch_functions(layer: torch.nn.Module, name: str) -> list:
    # Instance attributes only: plain dict lookups on every forward (not nn.Module's __getattr__).
    attribute = PATCH_FUNCTIONS.get(name)
    return (layer.__dict__.get(attribute) or []) if attribute else []


def _held_elsewhere(layer: torch.nn.Module, device: torch.device) -> bool:
    # Called on every forward of every layer: plain loops, no containers built.
    for tensor in layer._parameters.values():
        if tensor is not None and tensor.device != device:
            return True
    for tensor in layer._buffers.values():
        if tensor is not None and tensor.device != device:
            return True
    return False


# Per-call weight patches a memory manager may attach to a layer it streams, applied to the moved
# copies in order: ComfyUI's ``weight_function`` / ``bias_function`` (a LoRA on a layer its partial
# load left offloaded comes this way; its own layers apply them in ``comfy.ops.cast_bias_weight``).
PATCH_FUNCTIONS = {"weight": "weight_function", "bias": "bias_function"}
PATCHABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextmanager
def _tensors_moved(layer: torch.nn.Module, device: torch.device):
    """For the block, the layer's own tensors are copies on ``device`` (with any per-call weight patches
    applied); the originals are put back after, unchanged."""
    saved = {kind: dict(table) for kind, table in _own_tensors(layer).items()}
    try:
        for kind, table in _own_tensors(layer).items():
            for name, tensor in saved[kind].items():
                if tensor is None:
                    continue
                patches = _patch_functions(layer, name)
                table[name] = _patched(layer, name, tensor, device, patches) if patches else to_device(tensor, device)
        yield
    finally:
        for kind, table in _own_tensors(layer).items():
            table.update(saved[kind])


def _patched(layer: torch.nn.Module, name: str, tensor: torch.Tensor, device: torch.device, patches) -> torch.Tensor:
    """A copy of ``tensor`` on ``device`` with the patches applied (they may work in place: never on the original)."""
    if tensor.dtype not in PATCHABLE_DTYPES:
        raise InvalidParameterError(
            f"A weight patch (e.g. a LoRA applied in ComfyUI) targets the {tensor.dtype} {name} of a "
            f"{type(layer).__name__} layer, a quantised layer that patches cannot be applied to. Load the "
            "model with its weights as stored (not fp8/GGUF) to use patches on it."
        )
    patched = tensor.to(device, copy=True)
    for patch in patches:
        patched = patch(patched)
    return patched


@functools.cache
def _offloadable_class(cls: type) -> type:
    # Same name and module as the original: framework code that checks class names keeps working.
    return type(cls.__name__, (OffloadableLayer, cls), {"__module__": cls.__module__,
                                                         "__qualname__": cls.__qualname__,
                                                         "offloadable_form_of": cls})


def _holds_state(module: torch.nn.Module) -> bool:
    """Whether the module has state-dict tensors of its own (parameters, persistent buffers)."""
    return any(t is not None for t in module._parameters.values()) or any(
        t is not None and name not in module._non_persistent_buffers_set for name, t in module._buffers.items())


def _is_layer(module: torch.nn.Module) -> bool:
    return _holds_state(module) and not any(_holds_state(child) for child in module.modules() if child is not module)


def _first_parameter_owner(part: torch.nn.Module) -> torch.nn.Module | None:
    first = next(part.parameters(), None)
    if first is None:
        return None
    return next((m for m in part.modules() if any(p is first for p in m._parameters.values())), None)


def make_layers_offloadable(part: torch.nn.Module) -> list[torch.nn.Module]:
    """Make every layer of ``part`` but the one holding its first parameter offloadable (idempotent).

    Returns the offloadable layers. The forward of an offloadable layer whose tensors are all on its
    input's device (and not flagged) is the original forward after one device check per tensor.
    """
    anchor = _first_parameter_owner(part)
    layers = []
    for module in part.modules():
        if module is anchor or not _is_layer(module):
            continue
        if not isinstance(module, OffloadableLayer):
            module.__class__ = _offloadable_class(type(module))
        layers.append(module)
    return layers


def offloadable_layers(part: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in part.modules() if isinstance(module, OffloadableLayer)]


def resident_tensors(part: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(owner, "_parameters" | "_buffers", name) of every tensor of ``part`` outside its offloadable layers."""
    return [(module, kind, name)
            for module in part.modules() if not isinstance(module, OffloadableLayer)
            for kind, table in _own_tensors(module).items()
            for name, tensor in table.items() if tensor is not None]


def place_resident(part: torch.nn.Module, device: torch.device | str) -> int:
    """Move the resident tensors of ``part`` to ``device`` in place; returns their bytes.

    Parameters keep their identity where the two devices allow it (``param.data`` is replaced, as
    ``Module.to`` does; between incompatible tensor types, e.g. to ``meta``, a new parameter).
    """
    device = torch.device(device)
    total = 0
    for module, kind, name in resident_tensors(part):
        tensor = _own_tensors(module)[kind][name]
        if tensor.device != device:
            moved = tensor.data.to(device)
            if kind == "_parameters" and torch._has_compatible_shallow_copy_type(tensor, moved):
                tensor.data = moved
            elif kind == "_parameters":
                module._parameters[name] = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = moved
        total += tensor.nbytes
    return total


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's own (non-recursive) parameters and buffers."""
    return sum(t.nbytes for table in _own_tensors(module).values() for t in table.values() if t is not None)
