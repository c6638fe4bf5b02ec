"""A cheap fingerprint of which weight tensors a module holds, for caches of values computed from them.

Two equal stamps mean the same tensors, at the same storage, not modified in place since: a cache
keyed by the stamp is recomputed after a weight swap, a device or dtype move, a LoRA patch or a
training step, and never serves a stale value. Hashing the values would cost a pass over every
weight; a stamp reads three integers per tensor.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def weights_stamp(tensors: Iterable[torch.Tensor]) -> tuple:
    """(identity, storage address, in-place version) of each tensor, in order.

    Inference tensors (weights loaded under ``torch.inference_mode``, as ComfyUI runs its nodes) keep
    no version counter; they are told apart by identity and storage alone.
    """
    return tuple((id(tensor), tensor.data_ptr(), None if tensor.is_inference() else tensor._version)
                 for tensor in tensors)
