"""The ladder DiT: SANA's transformer with one condition per block, and the connector before it.

diffusers' ``SanaTransformer2DModel`` feeds every block the same caption embedding; TBAC-UniImage
feeds block ``i`` the embedding of its own MLLM rung. We reuse diffusers' modules (patch embed,
timestep embedding, blocks, output norm) and only rewrite the loop that wires them, so the keys
of ``model.transformer.*`` load unchanged.
"""
from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.normalization import RMSNorm
from torch import nn

# The official connector's RMSNorm starts at sqrt(5.5) and is trained; the value comes from the
# checkpoint, but a freshly built connector (training) starts here.
CONNECTOR_NORM_INIT = 5.5**0.5


class Connector(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear -> RMSNorm, applied to each rung's metaquery states.

    Module indices 0, 2, 3 match the checkpoint keys ``model.connector.{0,2,3}.*``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        norm = RMSNorm(out_dim, eps=1e-5, elementwise_affine=True)
        super().__init__(
            nn.Linear(in_dim, out_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(out_dim, out_dim),
            norm,
        )
        with torch.no_grad():
            if norm.weight.device.type != "meta":
                norm.weight.fill_(CONNECTOR_NORM_INIT)


class LadderDiT(nn.Module):
    """Connector + SANA DiT where each transformer block reads its own condition."""

    def __init__(self, transformer: SanaTransformer2DModel, connector: Connector):
        super().__init__()
        self.transformer = transformer
        self.connector = connector

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def embed_condition(self, metaquery_states: torch.Tensor) -> torch.Tensor:
        """Metaquery states [B, N, hidden] -> cross-attention input [B, N, D] of a block.

        Step-invariant: computed once per generation, not at every denoising step.
        """
        states = metaquery_states.to(device=self.device, dtype=self.connector[0].weight.dtype)
        states = self.connector(states).to(self.dtype)
        return self.transformer.caption_norm(self.transformer.caption_projection(states))

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, H, W]
        timestep: torch.Tensor,  # [B]
        block_conditions: list[torch.Tensor],  # num_blocks x [B, N, D] (from embed_condition)
        condition_mask_bias: torch.Tensor | None = None,  # [B, 1, N] additive bias
    ) -> torch.Tensor:
        dit = self.transformer
        batch_size, _, height, width = latents.shape
        patch = dit.config.patch_size
        patch_height, patch_width = height // patch, width // patch

        hidden_states = dit.patch_embed(latents.to(self.dtype))
        timestep_emb, embedded_timestep = dit.time_embed(
            timestep, batch_size=batch_size, hidden_dtype=hidden_states.dtype
        )
        for block, condition in zip(dit.transformer_blocks, block_conditions):
            hidden_states = block(
                hidden_states,
                None,
                condition,
                condition_mask_bias,
                timestep_emb,
                patch_height,
                patch_width,
            )
        hidden_states = dit.norm_out(hidden_states, embedded_timestep, dit.scale_shift_table)
        hidden_states = dit.proj_out(hidden_states)
        # [B, h*w, p*p*C] -> [B, C, h*p, w*p]
        hidden_states = hidden_states.reshape(batch_size, patch_height, patch_width, patch, patch, -1)
        hidden_states = hidden_states.permute(0, 5, 1, 3, 2, 4)
        return hidden_states.reshape(batch_size, -1, patch_height * patch, patch_width * patch)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] keep-mask -> [B, 1, N] additive attention bias, as SANA does."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
