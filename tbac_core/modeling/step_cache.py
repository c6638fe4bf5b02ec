"""First-Block-Cache for the ladder DiT: skip the remaining blocks when block 0 barely changed.

Between neighbouring denoising steps the DiT's output changes little over long stretches of the
schedule. First-Block-Cache (ParaAttention / diffusers' ``FirstBlockCacheConfig``) uses the first
block's output residual as a cheap probe: when its relative L1 change against the last *full* step
is below a threshold, the residual the remaining blocks added at that full step is reused instead
of running them. Approximate by design, so it is opt-in (``SamplingParams.cache_threshold``).

One cache per generation and per guidance-batched DiT call: all rows decide together.
"""
from __future__ import annotations

import torch


class FirstBlockCache:
    """Per-generation state: the last full step's residuals, and counts of full/reused steps."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.first_residual: torch.Tensor | None = None  # [B, L, D] block 0's output - input
        self.rest_residual: torch.Tensor | None = None  # [B, L, D] blocks 1.. output - input
        self.full_steps = 0
        self.reused_steps = 0

    def relative_change(self, first_residual: torch.Tensor) -> float:
        """mean |r - r_full| / mean |r_full| against the last full step's block-0 residual."""
        previous = self.first_residual
        change = (first_residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
        return float(change)

    def can_reuse(self, first_residual: torch.Tensor) -> bool:
        """Whether this step may skip blocks 1..: a full step exists and block 0 moved < threshold."""
        if self.first_residual is None or self.first_residual.shape != first_residual.shape:
            return False
        reuse = self.relative_change(first_residual) < self.threshold
        if reuse:
            self.reused_steps += 1
        return reuse

    def apply(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Block 0's output [B, L, D] -> the estimated output of the last block."""
        return hidden_states + self.rest_residual

    def keep_rows(self, rows: slice) -> None:
        """Keep the cached residuals of these batch rows only (guidance truncation drops branches)."""
        if self.first_residual is not None:
            self.first_residual = self.first_residual[rows]
            self.rest_residual = self.rest_residual[rows]

    def store(self, first_residual: torch.Tensor, rest_residual: torch.Tensor) -> None:
        """Remember a full step's residuals (the reference of the steps that follow)."""
        self.first_residual = first_residual
        self.rest_residual = rest_residual
        self.full_steps += 1
