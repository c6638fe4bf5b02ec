"""Swapping submodules for drop-in equivalents (same parameters, same names, so checkpoint keys load unchanged)."""
from __future__ import annotations

from torch import nn


def swap_children(model: nn.Module, selected, replacement) -> int:
    """Replace each submodule for which ``selected(child)`` holds by ``replacement(child)`` -> how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if selected(child)]
    for parent, name, child in swaps:
        setattr(parent, name, replacement(child))
    return len(swaps)
