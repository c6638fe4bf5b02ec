"""Finite-weight checks: which tensors of a model (or of an adapter file) hold NaN or inf values.

A checkpoint damaged by a failed training run or a bad conversion may hold NaN weights. Scanning
every weight at load time would cost seconds per load on a 3B model, so the pipeline scans only
when sampling produced NaN, to tell "the weights are not finite, here" from "the guidance was
too strong"; ``apply_adapter`` scans the (small) adapter tensors before applying them.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import NonFiniteWeightsError

COMPONENTS = {"mllm": "the MLLM", "dit.connector": "the connector", "dit.transformer": "the DiT", "vae": "the DC-AE"}
MAX_NAMED = 5  # tensors named in a message


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN/inf (tensors on the meta device are skipped)."""
    bad = []
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        values = tensor.detach()
        if values.element_size() == 1:  # fp8 storage: isfinite needs a wider type
            values = values.to(torch.float16)
        if not bool(torch.isfinite(values).all()):
            bad.append(name)
    return bad


def model_nonfinite_weights(model) -> dict[str, list[str]]:
    """Per component of a ``TBACModel`` (``COMPONENTS``), the names of its weights holding NaN/inf."""
    found = {}
    for path in COMPONENTS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr)
        bad = nonfinite_tensors([*module.named_parameters(), *module.named_buffers()])
        if bad:
            found[path] = bad
    return found


def check_model_weights_finite(model) -> None:
    """Raise ``NonFiniteWeightsError`` naming the component, tensors and checkpoint when a weight is NaN/inf."""
    found = model_nonfinite_weights(model)
    if not found:
        return
    parts = []
    for path, names in found.items():
        more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
        listed = ", ".join(names[:MAX_NAMED]) + more
        parts.append(f"{COMPONENTS[path]} ({path}: {len(names)} tensors: {listed})")
    raise NonFiniteWeightsError(
        f"The weights of model {model.identity.name!r} are not finite (NaN or inf) in " + "; ".join(parts)
        + f". The checkpoint {model.checkpoint_dir} (or an adapter applied to it) is damaged: every image would be "
        f"black or noise whatever the settings. Re-download or re-export it; no guidance or dtype change helps."
    )
