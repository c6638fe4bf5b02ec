"""How much memory a denoising batch needs, checked before the work starts.

Batching several prompts' denoising into one DiT call (the batch command's throughput mode) trades
memory for speed: the DiT's activations grow with the number of rows. The estimate is the largest
block's working set per row — the hidden states plus SANA's Mix-FFN, whose inverted convolution
widens every image token to ``2 * mlp_ratio * D`` channels — times a margin, and it is compared
with what the device has free before any row is denoised.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import InvalidParameterError

# Per image token, in units of the hidden size D, what one SANA block holds at its peak: input and
# residual states, attention q/k/v, and the Mix-FFN's 2 * mlp_ratio * D inverted + depthwise maps.
HIDDEN_COPIES = 6
# The estimate against the measured peak growth of a denoising call (bench/speed_bench.py --memory):
MARGIN = 2.0
MEMINFO = Path("/proc/meminfo")


def denoise_bytes_per_row(dit, latent_height: int, latent_width: int) -> int:
    """Estimated peak bytes one DiT row (one image of one guidance branch) adds while denoising."""
    config = dit.transformer.config
    tokens = (latent_height // config.patch_size) * (latent_width // config.patch_size)
    hidden = config.num_attention_heads * config.attention_head_dim
    mlp_ratio = getattr(config, "mlp_ratio", 2.5)
    copies = HIDDEN_COPIES + 4 * mlp_ratio
    element = torch.empty((), dtype=dit.dtype).element_size()
    return int(MARGIN * tokens * hidden * copies * element)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's free bytes; CPU: Linux MemAvailable); None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu" and MEMINFO.is_file():
        match = re.search(r"MemAvailable:\s+(\d+) kB", MEMINFO.read_text())
        return int(match.group(1)) * 1024 if match else None
    return None


def check_denoise_memory(dit, rows: int, latent_height: int, latent_width: int, what: str = "this batch") -> None:
    """Refuse a denoising batch of ``rows`` DiT rows that would not fit into the free memory."""
    per_row = denoise_bytes_per_row(dit, latent_height, latent_width)
    free = available_bytes(dit.device)
    if free is None or rows * per_row <= free:
        return
    fits = max(free // per_row, 0)
    raise InvalidParameterError(
        f"{what} needs about {rows * per_row / 2**20:.0f} MiB for the DiT's activations ({rows} rows x "
        f"{per_row / 2**20:.0f} MiB at latent {latent_width}x{latent_height}) but {dit.device} has "
        f"{free / 2**20:.0f} MiB free; at most {fits} rows fit. Batch fewer prompts at once."
    )
