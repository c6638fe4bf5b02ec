"""The ladder: which MLLM layer ("rung") conditions each DiT block, and the tools that edit it.

``conditioning``: the ``LadderConditioning`` value; ``layer_spec``: the layer-selection grammar;
``block_spec``: the per-block grammar of weights and mixes; ``edit``: select, weight and mix
(none runs the MLLM again); ``inspection``: metrics, the text summary and ``inspect`` (drawn by
``plot``, which alone imports matplotlib); ``io``: the saved-conditioning file format.
"""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".conditioning": ("LadderConditioning", "ModelIdentity", "RungSource", "BlockTerm"),
    ".layer_spec": ("LAYER_SPEC_SYNTAX", "parse_layer_spec", "default_rungs", "describe_mapping"),
    ".block_spec": ("WEIGHT_SPEC_SYNTAX", "parse_block_weights", "MIX_SPEC_SYNTAX", "parse_mix_spec"),
    ".edit": ("select_layers", "weight_blocks", "mix"),
    ".inspection": ("inspect", "describe_conditioning", "rung_norms", "rung_similarity", "block_similarity"),
    ".io": ("FILE_EXTENSION", "save_conditioning", "load_conditioning"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
