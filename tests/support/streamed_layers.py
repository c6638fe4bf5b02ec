"""A layer in the form ComfyUI's partial load leaves it (``layer_offload``), for the fast-path tests."""
from __future__ import annotations

import torch

from tbac_core.modeling.layer_offload import make_layers_offloadable


def stream(layer: torch.nn.Module, *parents: torch.nn.Module) -> torch.nn.Module:
    """``layer`` made offloadable and flagged offloaded (copies per call), as a partial load leaves it.

    ``parents``: modules holding it (made offloadable with it); a part's first layer stays resident,
    so a stand-in one goes in front.
    """
    part = torch.nn.ModuleList([torch.nn.Linear(1, 1), *(parents or (layer,))])
    assert layer in make_layers_offloadable(part)
    layer.weights_offloaded = True
    return layer


def forbid_calls(monkeypatch, module: torch.nn.Module) -> None:
    """Any call of ``module`` fails the test: a fast path must compute from its weights instead."""
    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{type(module).__name__} ran: the fast path was not taken")

    monkeypatch.setattr(module, "forward", refuse)
