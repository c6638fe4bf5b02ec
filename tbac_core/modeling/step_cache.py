"""First-Block-Cache for the ladder DiT: skip the remaining blocks when block 0 barely changed.

Between neighbouring denoising steps the DiT's output changes little over long stretches of the
schedule. First-Block-Cache (ParaAttention / diffusers' ``FirstBlockCacheConfig``) uses the first
block's output residual as a cheap probe: when its relative L1 change against the last *full* step
is below a threshold, the remaining blocks are not run and their residual is estimated from the
full steps instead. Approximate by design, so it is opt-in (``SamplingParams.cache_threshold``).

Two refinements over reusing the last residual as it is, both measured (README, "Speed"):

* The estimate extrapolates linearly in the timestep from the last two full steps (a first-order
  Taylor step, as TaylorSeer does), so a reused step follows the residual's trend instead of
  freezing it: on the trained demo model +6 to +8 dB PSNR at the same share of blocks run.
* At most ``max_skips`` steps in a row are estimated; then a full step refreshes the reference.
  Without that bound one small probe change can freeze the rest of the schedule.

One cache per generation and per guidance-batched DiT call: all rows decide together.
"""
from __future__ import annotations

import torch


class FirstBlockCache:
    """Per-generation state: the last two full steps' residuals and the skips since the last of them."""

    def __init__(self, threshold: float, max_skips: int):
        self.threshold = threshold
        self.max_skips = max_skips
        self.first_residual: torch.Tensor | None = None  # [B, L, D] block 0's output - input, last full step
        # (timestep [1], blocks 1..'s output - input [B, L, D]) of the last two full steps, oldest first.
        self.full_history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skips_in_a_row = 0

    def relative_change(self, first_residual: torch.Tensor) -> float:
        """mean |r - r_full| / mean |r_full| against the last full step's block-0 residual."""
        previous = self.first_residual
        change = (first_residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
        return float(change)

    def can_reuse(self, first_residual: torch.Tensor) -> bool:
        """Whether this step may skip blocks 1..: a full step exists, fewer than ``max_skips`` steps
        in a row were skipped, and block 0 moved less than the threshold."""
        if self.first_residual is None or self.first_residual.shape != first_residual.shape:
            return False
        reuse = self.skips_in_a_row < self.max_skips and self.relative_change(first_residual) < self.threshold
        if reuse:
            self.skips_in_a_row += 1
        return reuse

    def apply(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Block 0's output [B, L, D] at ``timestep`` ([B], one value) -> the estimated last block's output."""
        (*older, (last_t, last_residual)) = self.full_history
        if not older:
            return hidden_states + last_residual
        (previous_t, previous_residual), = older
        # A tensor ratio, not a Python float: no device sync per step on a GPU. Equal timesteps
        # (possible only in a degenerate schedule) give no slope rather than a division by zero.
        span = last_t - previous_t
        ratio = torch.where(span != 0, (timestep[:1].float() - last_t) / span, torch.zeros_like(span))
        ratio = ratio.to(last_residual.dtype)
        return hidden_states + last_residual + (last_residual - previous_residual) * ratio

    def keep_rows(self, rows: slice) -> None:
        """Keep the cached residuals of these batch rows only (guidance truncation drops branches)."""
        if self.first_residual is not None:
            self.first_residual = self.first_residual[rows]
        self.full_history = [(t, residual[rows]) for t, residual in self.full_history]

    def store(self, first_residual: torch.Tensor, rest_residual: torch.Tensor, timestep: torch.Tensor) -> None:
        """Remember a full step's residuals at ``timestep`` ([B], one value): the reference of the next steps."""
        if self.first_residual is not None and self.first_residual.shape != first_residual.shape:
            self.full_history = []  # other rows: the older references no longer apply
        self.first_residual = first_residual
        self.full_history = [*self.full_history[-1:], (timestep[:1].float(), rest_residual)]
        self.skips_in_a_row = 0
