"""Building modules without weights: on the meta device, with no weight initialisation run.

Every module we build receives all its tensors from a checkpoint afterwards, so initialising them
is wasted work. ``accelerate.init_empty_weights`` puts the parameters on the meta device, but
transformers still runs its ``init_weights`` pass over them (0.2 s of a 0.7 s load for
Qwen2.5-VL-3B, measured); ``no_init_weights`` (transformers' own, used by its ``from_pretrained``)
skips that pass and torch's ``reset_parameters`` initialisers.
"""
from __future__ import annotations

from contextlib import contextmanager

from accelerate import init_empty_weights

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.5x
    from transformers.modeling_utils import no_init_weights


@contextmanager
def empty_weights():
    """Modules built inside have their parameters on the meta device, uninitialised.

    Buffers (rotary frequencies, ...) are computed as usual, on the CPU.
    """
    with init_empty_weights(), no_init_weights():
        yield
