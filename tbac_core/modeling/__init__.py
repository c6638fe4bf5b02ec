"""The model: frozen Qwen2.5-VL MLLM, metaquery connector + ladder DiT (SANA), and the DC-AE."""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".model": ("TBACModel",),
    ".dit": ("LadderDiT", "Connector", "ConditionKVCache", "mask_to_bias"),
    ".vae": ("decode_signed", "encode_signed"),
    ".layer_offload": ("PATCH_FUNCTIONS", "make_layers_offloadable", "offloadable_layers", "place_resident",
                       "resident_tensors"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
