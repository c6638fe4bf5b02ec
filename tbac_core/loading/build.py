"""Building a ready-to-run ``TBACModel`` from a checkpoint folder in the official format."""
from __future__ import annotations

from ..modeling.model import TBACModel


def load_model(checkpoint_dir, **kwargs) -> TBACModel:
    """Load a checkpoint (see ``TBACModel.from_pretrained`` for the arguments)."""
    return TBACModel.from_pretrained(checkpoint_dir, **kwargs)
