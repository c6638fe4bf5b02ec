"""``comfy_api.v0_0_2.io`` (test double): V3 node schema, the socket types the pack uses, node base.

Observable behaviour kept equal to ComfyUI v0.24 (``comfy_api/latest/_io.py``):

* every input's ``as_dict()`` lists its options with ``None`` values left out (``False`` stays);
* ``Schema.get_v1_info`` makes the classic description: ``input = {"required": {...}, "optional":
  {...}, "hidden": {...}}`` with ``(io_type, options)`` per input (a combo is ``("COMBO", {"options":
  [...], ...})``; the ``optional`` flag itself is dropped), ``input_order``, ``output`` (io types),
  ``output_name`` (display name, else the id, else the io type), ``output_tooltips``, ...;
* an output node gets the hidden inputs ``PROMPT`` and ``EXTRA_PNGINFO``;
* ``ComfyNode`` exposes the classic class attributes (``INPUT_TYPES()``, ``RETURN_TYPES`` as a list,
  ``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``OUTPUT_NODE``, ``CATEGORY``, ``DESCRIPTION``, ``FUNCTION``)
  computed from ``define_schema()``, and ``EXECUTE_NORMALIZED`` turns what ``execute`` returns into
  a ``NodeOutput``.
"""
from __future__ import annotations

import inspect
from abc import ABC
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


def prune_dict(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class classproperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


# -- types, inputs and outputs ---------------------------------------------------------------------
class _ComfyType(ABC):
    io_type: str = None


class Input:
    Parent: type[_ComfyType] = None

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}
        self.rawLink = raw_link
        self.advanced = advanced

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def as_dict(self) -> dict:
        return prune_dict({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                           "lazy": self.lazy, "rawLink": self.rawLink, "advanced": self.advanced}) \
            | prune_dict(self.extra_dict)

    def get_io_type(self) -> str:
        return self.io_type

    def get_all(self) -> list[Input]:
        return [self]

    def validate(self) -> None:
        pass


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None, socketless: bool = None, widget_type: str = None, force_input: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self) -> dict:
        return super().as_dict() | prune_dict({"default": self.default, "socketless": self.socketless,
                                               "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output:
    Parent: type[_ComfyType] = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def validate(self) -> None:
        pass


def comfytype(io_type: str):
    """Bind ``io_type`` to a type class and give it its own Input / Output classes."""

    def decorate(cls):
        cls.io_type = io_type
        for name in ("Input", "Output"):
            base = getattr(cls, name, None)
            if base is not None:
                own = type(base.__name__, (base,), {"Parent": cls, "__qualname__": f"{cls.__name__}.{name}"})
                setattr(cls, name, own)
        return cls

    return decorate


class ComfyTypeIO(_ComfyType):
    Input = Input
    Output = Output


def Custom(io_type: str) -> type[ComfyTypeIO]:
    @comfytype(io_type)
    class CustomComfyType(ComfyTypeIO):
        pass

    return CustomComfyType


@comfytype("BOOLEAN")
class Boolean(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: bool = None, label_on: str = None, label_off: str = None, socketless: bool = None,
                     force_input: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self) -> dict:
            return super().as_dict() | prune_dict({"label_on": self.label_on, "label_off": self.label_off})


@comfytype("INT")
class Int(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode=None, socketless: bool = None,
                     force_input: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self) -> dict:
            return super().as_dict() | prune_dict({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None,
            })


@comfytype("FLOAT")
class Float(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: float = None, min: float = None, max: float = None, step: float = None,
                     round: float = None, display_mode=None, gradient_stops: list = None, socketless: bool = None,
                     force_input: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.min, self.max, self.step, self.round = min, max, step, round
            self.display_mode = display_mode
            self.gradient_stops = gradient_stops

        def as_dict(self) -> dict:
            return super().as_dict() | prune_dict({
                "min": self.min, "max": self.max, "step": self.step, "round": self.round,
                "display": self.display_mode, "gradient_stops": self.gradient_stops,
            })


@comfytype("STRING")
class String(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     multiline=False, placeholder: str = None, default: str = None, dynamic_prompts: bool = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None,
                     advanced: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self) -> dict:
            return super().as_dict() | prune_dict({"multiline": self.multiline, "placeholder": self.placeholder,
                                                   "dynamicPrompts": self.dynamic_prompts})


@comfytype("COMBO")
class Combo(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id: str, options: list = None, display_name: str = None, optional=False,
                     tooltip: str = None, lazy: bool = None, default=None, control_after_generate: bool = None,
                     upload=None, image_folder=None, remote=None, socketless: bool = None, extra_dict=None,
                     raw_link: bool = None, advanced: bool = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None,
                             extra_dict, raw_link, advanced)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self) -> dict:
            return super().as_dict() | prune_dict({
                "multiselect": self.multiselect, "options": self.options,
                "control_after_generate": self.control_after_generate,
                **({self.upload.value: True} if self.upload is not None else {}),
                "image_folder": self.image_folder.value if self.image_folder else None,
                "remote": self.remote.as_dict() if self.remote else None,
            })


@comfytype("IMAGE")
class Image(ComfyTypeIO):
    pass


@comfytype("MASK")
class Mask(ComfyTypeIO):
    pass


@comfytype("LATENT")
class Latent(ComfyTypeIO):
    pass


@comfytype("CONDITIONING")
class Conditioning(ComfyTypeIO):
    pass


@comfytype("MODEL")
class Model(ComfyTypeIO):
    pass


@comfytype("SIGMAS")
class Sigmas(ComfyTypeIO):
    pass


@comfytype("VAE")
class Vae(ComfyTypeIO):
    pass


# -- schema ----------------------------------------------------------------------------------------
class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


@dataclass
class NodeInfoV1:
    input: dict = None
    input_order: dict = None
    is_input_list: bool = None
    output: list = None
    output_is_list: list = None
    output_name: list = None
    output_tooltips: list = None
    output_matchtypes: list = None
    name: str = None
    display_name: str = None
    description: str = None
    python_module: Any = None
    category: str = None
    output_node: bool = None
    deprecated: bool = None
    experimental: bool = None
    dev_only: bool = None
    api_node: bool = None
    price_badge: dict = None
    search_aliases: list = None
    essentials_category: str = None
    has_intermediate_output: bool = None


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False
    essentials_category: str = None
    has_intermediate_output: bool = False

    def validate(self) -> None:
        input_ids = [i.id for entry in self.inputs for i in entry.get_all()]
        output_ids = [o.id for o in self.outputs]
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(f"Input ids must be unique, but {[k for k, n in Counter(input_ids).items() if n > 1]} are not.")
        if len(set(output_ids)) != len(output_ids):
            issues.append(f"Output ids must be unique, but {[k for k, n in Counter(output_ids).items() if n > 1]} are not.")
        if issues:
            raise ValueError("\n".join(issues))
        for entry in [*self.inputs, *self.outputs]:
            entry.validate()

    def finalize(self) -> None:
        self.inputs = self.inputs or []
        self.outputs = self.outputs or []
        self.hidden = self.hidden or []
        if self.is_output_node:
            for hidden in (Hidden.prompt, Hidden.extra_pnginfo):
                if hidden not in self.hidden:
                    self.hidden.append(hidden)
        for index, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{index}_{output.io_type}_"

    def get_v1_info(self, cls) -> NodeInfoV1:
        inputs: dict = {"required": {}}
        for entry in self.inputs:
            options = entry.as_dict()
            options.pop("optional", None)
            inputs.setdefault("optional" if entry.optional else "required", {})[entry.id] = (entry.get_io_type(), options)
        for hidden in self.hidden:
            inputs.setdefault("hidden", {})[hidden.name] = (hidden.value,)
        return NodeInfoV1(
            input=inputs,
            input_order={key: list(value) for key, value in inputs.items()},
            is_input_list=self.is_input_list,
            output=[o.io_type for o in self.outputs],
            output_is_list=[o.is_output_list for o in self.outputs],
            output_name=[o.display_name if o.display_name else o.io_type for o in self.outputs],
            output_tooltips=[o.tooltip if o.tooltip else None for o in self.outputs],
            output_matchtypes=None,
            name=self.node_id,
            display_name=self.display_name,
            category=self.category,
            description=self.description,
            output_node=self.is_output_node,
            has_intermediate_output=self.has_intermediate_output,
            deprecated=self.is_deprecated,
            experimental=self.is_experimental,
            dev_only=self.is_dev_only,
            api_node=self.is_api_node,
            python_module=getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
            price_badge=None,
            search_aliases=self.search_aliases if self.search_aliases else None,
            essentials_category=self.essentials_category,
        )


# -- node base and output --------------------------------------------------------------------------
class NodeOutput:
    def __init__(self, *args: Any, ui: dict = None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    @classmethod
    def from_dict(cls, data: dict) -> NodeOutput:
        return cls(*data.get("result", ()), ui=data.get("ui"), expand=data.get("expand"))


def first_real_override(cls: type, name: str):
    """``cls.<name>`` when some class below ``ComfyNode`` defines it, else None (as ComfyUI checks it)."""
    base_func = getattr(ComfyNode, name).__func__
    for klass in cls.mro():
        if klass is ComfyNode:
            break
        if name in klass.__dict__ and getattr(klass, name).__func__ is not base_func:
            return getattr(cls, name)
    return None


class ComfyNode:
    """Base of V3 nodes: ``define_schema`` and ``execute`` are classmethods a node defines."""

    RELATIVE_PYTHON_MODULE = None
    SCHEMA = None
    hidden = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs) -> list[str]:
        return [name for name in kwargs if kwargs[name] is None]

    def __init__(self):
        type(self).VALIDATE_CLASS()

    @classmethod
    def VALIDATE_CLASS(cls) -> None:
        for name in ("define_schema", "execute"):
            if first_real_override(cls, name) is None:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")

    @classmethod
    def FINALIZE_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        cls.VALIDATE_CLASS()
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.FINALIZE_SCHEMA().get_v1_info(cls).input

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        return asdict(cls.GET_SCHEMA().get_v1_info(cls))

    @classproperty
    def FUNCTION(cls):  # noqa: N802
        return "EXECUTE_NORMALIZED_ASYNC" if inspect.iscoroutinefunction(cls.execute) else "EXECUTE_NORMALIZED"

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        returned = cls.execute(*args, **kwargs)
        if returned is None:
            return NodeOutput()
        if isinstance(returned, NodeOutput):
            return returned
        if isinstance(returned, tuple):
            return NodeOutput(*returned)
        if isinstance(returned, dict):
            return NodeOutput.from_dict(returned)
        raise Exception(f"Invalid return type from node: {type(returned)}")

    # the classic class attributes, read from the schema (ComfyUI computes them once per class)
    @classproperty
    def DESCRIPTION(cls):  # noqa: N802
        return cls.GET_SCHEMA().description

    @classproperty
    def CATEGORY(cls):  # noqa: N802
        return cls.GET_SCHEMA().category

    @classproperty
    def OUTPUT_NODE(cls):  # noqa: N802
        return cls.GET_SCHEMA().is_output_node

    @classproperty
    def INPUT_IS_LIST(cls):  # noqa: N802
        return cls.GET_SCHEMA().is_input_list

    @classproperty
    def RETURN_TYPES(cls):  # noqa: N802
        return [o.io_type for o in cls.GET_SCHEMA().outputs]

    @classproperty
    def RETURN_NAMES(cls):  # noqa: N802
        return [o.display_name if o.display_name else o.io_type for o in cls.GET_SCHEMA().outputs]

    @classproperty
    def OUTPUT_IS_LIST(cls):  # noqa: N802
        return [o.is_output_list for o in cls.GET_SCHEMA().outputs]

    @classproperty
    def OUTPUT_TOOLTIPS(cls):  # noqa: N802
        return [o.tooltip if o.tooltip else None for o in cls.GET_SCHEMA().outputs]
