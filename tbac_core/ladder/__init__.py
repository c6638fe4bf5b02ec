"""The ladder: which MLLM layer ("rung") conditions each DiT block, and the tools that edit it.

``conditioning``: the ``LadderConditioning`` value; ``layer_spec``: the layer-selection grammar;
the operations (select, weight, mix, inspect, save/load) work on conditionings without running
the MLLM again.
"""
from .._exports import lazy_exports

_EXPORTS = {
    "LadderConditioning": ".conditioning",
    "ModelIdentity": ".conditioning",
    "RungSource": ".conditioning",
    "BlockTerm": ".conditioning",
    "LAYER_SPEC_SYNTAX": ".layer_spec",
    "WEIGHT_SPEC_SYNTAX": ".layer_spec",
    "parse_layer_spec": ".layer_spec",
    "parse_block_weights": ".layer_spec",
    "default_rungs": ".layer_spec",
    "describe_mapping": ".layer_spec",
    "MIX_SPEC_SYNTAX": ".ops",
    "parse_mix_spec": ".ops",
    "select_layers": ".ops",
    "weight_blocks": ".ops",
    "mix": ".ops",
    "inspect": ".ops",
    "describe_conditioning": ".ops",
    "rung_norms": ".ops",
    "rung_similarity": ".ops",
    "block_similarity": ".ops",
    "FILE_EXTENSION": ".ops",
    "save_conditioning": ".ops",
    "load_conditioning": ".ops",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
