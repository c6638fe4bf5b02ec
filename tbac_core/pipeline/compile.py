"""``torch.compile`` of the DiT blocks, with a check that the compiler it needs is there.

Inductor generates C++ on the CPU (it needs a C++ compiler) and Triton kernels on CUDA (it needs
the ``triton`` package). Without them the failure would only come at the first denoising step, in
the middle of a job; here it is found before, logged with what to install, and the DiT runs
uncompiled (same numbers, no speed-up).
"""
from __future__ import annotations

import logging
import shutil

import torch

logger = logging.getLogger(__name__)


def compiler_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot generate code for ``device`` here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "the 'triton' package is missing (pip install triton)"
    if device.type == "cpu":
        from torch._inductor import config

        compilers = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        if any(name and shutil.which(name) for name in compilers):
            return None
        return f"no C++ compiler was found (looked for {', '.join(str(c) for c in compilers if c)}; install g++)"
    return f"compiling for the {device.type} device is not supported by this library"


def compile_dit_blocks(dit, device: torch.device) -> bool:
    """Compile each transformer block of ``dit`` in place for ``device`` -> whether it was compiled."""
    problem = compiler_problem(device)
    if problem is not None:
        logger.warning("compile_dit: torch.compile is not used because %s; the DiT runs uncompiled "
                       "(same images, no speed-up).", problem)
        return False
    for block in dit.transformer.transformer_blocks:
        block.compile()
    return True
