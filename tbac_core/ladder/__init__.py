"""The ladder: which MLLM layer ("rung") conditions each DiT block, and the tools that edit it.

``conditioning``: the ``LadderConditioning`` value; ``layer_spec``: the layer-selection grammar;
``block_spec``: the per-block grammar of weights and mixes; ``edit``: select, weight and mix
(none runs the MLLM again); ``inspection``: metrics, the text summary and ``inspect`` (drawn by
``plot``, which alone imports matplotlib); ``io``: the saved-conditioning file format.
"""
from .._exports import lazy_exports

_EXPORTS = {
    "LadderConditioning": ".conditioning",
    "ModelIdentity": ".conditioning",
    "RungSource": ".conditioning",
    "BlockTerm": ".conditioning",
    "LAYER_SPEC_SYNTAX": ".layer_spec",
    "WEIGHT_SPEC_SYNTAX": ".block_spec",
    "parse_layer_spec": ".layer_spec",
    "parse_block_weights": ".block_spec",
    "default_rungs": ".layer_spec",
    "describe_mapping": ".layer_spec",
    "MIX_SPEC_SYNTAX": ".block_spec",
    "parse_mix_spec": ".block_spec",
    "select_layers": ".edit",
    "weight_blocks": ".edit",
    "mix": ".edit",
    "inspect": ".inspection",
    "describe_conditioning": ".inspection",
    "rung_norms": ".inspection",
    "rung_similarity": ".inspection",
    "block_similarity": ".inspection",
    "FILE_EXTENSION": ".io",
    "save_conditioning": ".io",
    "load_conditioning": ".io",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
