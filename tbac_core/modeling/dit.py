"""The ladder DiT: SANA's transformer with one condition per block, and the connector before it.

diffusers' ``SanaTransformer2DModel`` feeds every block the same caption embedding; TBAC-UniImage
feeds block ``i`` the embedding of its own MLLM rung. We reuse diffusers' modules (patch embed,
timestep embedding, blocks, output norm) and only rewrite the loop that wires them, so the keys
of ``model.transformer.*`` load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel
from diffusers.models.normalization import RMSNorm
from torch import nn

from .contiguous import make_inputs_contiguous
from .linear_attention import use_token_major_linear_attention
from .mix_ffn import use_token_major_ffn
from .onednn_linear import use_onednn_linears
from .step_cache import FirstBlockCache

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


@dataclass(frozen=True)
class CrossAttentionKV:
    """One block's cross-attention keys and values of its (step-invariant) condition.

    The condition does not change across denoising steps, so ``attn2.to_k`` / ``attn2.to_v`` (and
    the mask's head expansion) run once per generation instead of once per step.
    """

    key: torch.Tensor  # [B, heads, N, head_dim]
    value: torch.Tensor  # [B, heads, N, head_dim]
    attention_mask: torch.Tensor | None  # [B, heads, 1, N] additive bias, or None

    def select_rows(self, rows: slice) -> CrossAttentionKV:
        """The keys/values of some batch rows (e.g. the positive guidance branch alone)."""
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        return CrossAttentionKV(self.key[rows], self.value[rows], mask)

    @staticmethod
    def cat(parts: list[CrossAttentionKV]) -> CrossAttentionKV:
        """Row groups' keys/values (all with a mask, or none) as one batch."""
        masks = [part.attention_mask for part in parts]
        mask = None if masks[0] is None else torch.cat(masks)
        return CrossAttentionKV(torch.cat([p.key for p in parts]), torch.cat([p.value for p in parts]), mask)


@dataclass(frozen=True)
class _CachedCondition:
    condition: torch.Tensor  # [rows, num_blocks * N, D] as the caller passed it
    mask_bias: torch.Tensor | None  # [rows, 1, N]
    weights: tuple  # _cross_attention_weights_stamp of the DiT when the keys/values were projected
    block_kv: list[CrossAttentionKV]  # num_blocks


class ConditionKVCache:
    """Cross-attention keys/values of conditions that come back step after step, for callers that
    hand the DiT its raw conditions at every step (ComfyUI's core samplers).

    A batch is made of equal row groups, each named by a key that the caller keeps for the whole
    sampling run (core's per-condition uuids). A group's keys/values are reused only when its
    condition and mask equal the stored ones (``torch.equal``: a copy's cost, against the two
    projections per block it saves) and the cross-attention weights are the same tensors, unmodified
    (ComfyUI hooks may patch weights between steps), so a reused key with other values is projected
    again, never served stale. Lives as long as the sampling run that made it (no eviction).
    """

    def __init__(self):
        self._entries: dict = {}
        self.computed = 0  # row groups whose keys/values were projected
        self.reused = 0  # row groups served from the cache

    def block_kv(
        self,
        dit: LadderDiT,
        condition: torch.Tensor,  # [B, num_blocks * N, D]: each block's condition side by side
        mask_bias: torch.Tensor | None,  # [B, 1, N]
        group_keys: list,  # one key per equal row group of the batch, in row order
    ) -> list[CrossAttentionKV]:
        """-> num_blocks ``CrossAttentionKV`` of the whole batch, for ``LadderDiT.forward``."""
        groups = len(group_keys)
        if groups == 0 or condition.shape[0] % groups:
            raise ValueError(f"{condition.shape[0]} condition rows do not split into {groups} equal groups")
        conditions = condition.chunk(groups)
        biases = [None] * groups if mask_bias is None else mask_bias.chunk(groups)
        weights = _cross_attention_weights_stamp(dit)
        per_group = [self._group_kv(dit, key, rows, bias, weights)
                     for key, rows, bias in zip(group_keys, conditions, biases)]
        if groups == 1:
            return per_group[0]
        return [CrossAttentionKV.cat(list(parts)) for parts in zip(*per_group)]

    def _group_kv(self, dit, key, condition, mask_bias, weights) -> list[CrossAttentionKV]:
        entry = self._entries.get(key)
        if (entry is not None and entry.weights == weights and _same(entry.condition, condition)
                and _same(entry.mask_bias, mask_bias)):
            self.reused += 1
            return entry.block_kv
        block_kv = dit.precompute_conditions(list(condition.chunk(dit.num_blocks, dim=1)), mask_bias)
        self._entries[key] = _CachedCondition(condition, mask_bias, weights, block_kv)
        self.computed += 1
        return block_kv


def _cross_attention_weights_stamp(dit: LadderDiT) -> tuple:
    """Which tensors the blocks' cross-attentions hold, and their in-place versions: equal stamps, same weights.

    Inference tensors (weights loaded under ``torch.inference_mode``, as ComfyUI runs its nodes) keep
    no version counter; they are told apart by identity and storage alone.
    """
    return tuple((id(tensor), tensor.data_ptr(), None if tensor.is_inference() else tensor._version)
                 for block in dit.transformer.transformer_blocks if block.attn2 is not None
                 for tensor in (*block.attn2.parameters(), *block.attn2.buffers()))


def _same(stored: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    if stored is None or given is None:
        return stored is given
    return (stored.shape == given.shape and stored.dtype == given.dtype and stored.device == given.device
            and torch.equal(stored, given))


class PrecomputedKVAttnProcessor:
    """diffusers' ``SanaAttnProcessor2_0`` that also takes a ``CrossAttentionKV`` as the encoder states.

    Given a tensor it runs the processor it replaced, so diffusers' own forward keeps working; given
    a ``CrossAttentionKV`` it skips the key/value projections and does the same arithmetic as
    ``SanaAttnProcessor2_0`` (identical on diffusers 0.34 ... 0.42).
    """

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if not isinstance(encoder_hidden_states, CrossAttentionKV):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask)
        kv = encoder_hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        heads, head_dim = kv.key.shape[1], kv.key.shape[3]
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(
            query, kv.key, kv.value, attn_mask=kv.attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def cross_attention_kv(attn, condition: torch.Tensor, mask_bias: torch.Tensor | None) -> CrossAttentionKV:
    """``condition`` [B, N, D] (+ ``mask_bias`` [B, 1, N]) -> the block's precomputed keys/values.

    The same steps as ``SanaAttnProcessor2_0`` takes for its key, value and mask.
    """
    # A strided view (one block's slice of core's side-by-side context) would send the projections
    # down a slow path: 28x slower for a bf16 linear on the CPU.
    condition = condition.contiguous()
    batch_size, length, _ = condition.shape
    key = attn.to_k(condition)
    value = attn.to_v(condition)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    head_dim = key.shape[-1] // attn.heads
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    mask = None
    if mask_bias is not None:
        mask = attn.prepare_attention_mask(mask_bias, length, batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
    return CrossAttentionKV(key, value, mask)


class LadderDiT(nn.Module):
    """Connector + SANA DiT where each transformer block reads its own condition."""

    def __init__(self, transformer: SanaTransformer2DModel, connector: Connector):
        super().__init__()
        self.transformer = transformer
        self.connector = connector
        for block in transformer.transformer_blocks:
            if block.attn2 is not None and not isinstance(block.attn2.processor, PrecomputedKVAttnProcessor):
                block.attn2.set_processor(PrecomputedKVAttnProcessor(block.attn2.processor))
        use_token_major_ffn(transformer.transformer_blocks)  # 1x1 convs as matmuls (mix_ffn: why)
        use_token_major_linear_attention(block.attn1 for block in transformer.transformer_blocks)
        use_onednn_linears(self)  # float32 CPU products through oneDNN (onednn_linear: why)
        # diffusers' self-attention processor, wherever it still runs (a block the token-major one does
        # not support, A/B runs), hands its output projection a transposed view (contiguous: why).
        make_inputs_contiguous(block.attn1.to_out[0] for block in transformer.transformer_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self._first_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._first_weight().device

    def _first_weight(self) -> torch.Tensor:
        """The DiT's first parameter (its ``scale_shift_table``, never quantised), whose dtype and device
        diffusers' ``dtype``/``device`` also report; they find it by walking every submodule on each
        call: 0.33 ms on the medium DiT, read ~4 times per denoising step."""
        return next(self.transformer.parameters())

    def embed_condition(self, metaquery_states: torch.Tensor) -> torch.Tensor:
        """Metaquery states [B, N, hidden] -> cross-attention input [B, N, D] of a block.

        Step-invariant: computed once per generation, not at every denoising step.
        """
        states = metaquery_states.to(device=self.device, dtype=self.connector[0].weight.dtype)
        states = self.connector(states).to(self.dtype)
        return self.transformer.caption_norm(self.transformer.caption_projection(states))

    def embed_timestep(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] timesteps -> (block modulation [B, 6 * D], output-norm embedding [B, D]).

        The sampler gives every guidance row the step's one timestep as an expanded tensor (stride
        0): that value is embedded once and broadcast, instead of once per row (the modulation's
        linear layer reads a [D, 6 * D] weight per call: 9.8 MB on the medium model, 120 MB at real
        size in float32).
        """
        rows = timestep.shape[0]
        if rows > 1 and timestep.stride(0) == 0:
            modulation, embedded = self.transformer.time_embed(timestep[:1], batch_size=1, hidden_dtype=dtype)
            return modulation.expand(rows, -1), embedded.expand(rows, -1)
        return self.transformer.time_embed(timestep, batch_size=rows, hidden_dtype=dtype)

    def precompute_conditions(
        self,
        block_conditions: list[torch.Tensor],  # num_blocks x [B, N, D] (from embed_condition)
        condition_mask_bias: torch.Tensor | None = None,  # [B, 1, N] additive bias
    ) -> list[CrossAttentionKV]:
        """Each block's cross-attention keys/values, once per generation; ``forward`` takes them."""
        return [
            cross_attention_kv(block.attn2, condition, condition_mask_bias)
            for block, condition in zip(self.transformer.transformer_blocks, block_conditions)
        ]

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, H, W]
        timestep: torch.Tensor,  # [B]
        block_conditions: list,  # num_blocks x [B, N, D] (embed_condition) or CrossAttentionKV (precompute_conditions)
        condition_mask_bias: torch.Tensor | None = None,  # [B, 1, N] additive bias; inside CrossAttentionKV already
        step_cache: FirstBlockCache | None = None,
    ) -> torch.Tensor:
        dit = self.transformer
        batch_size, _, height, width = latents.shape
        patch = dit.config.patch_size
        patch_height, patch_width = height // patch, width // patch

        # [B, h*w, D]; the patch embedding returns a transposed view, which would make block 0's residual
        # stream strided and its projections slow on the CPU (contiguous.py: why).
        hidden_states = dit.patch_embed(latents.to(self.dtype)).contiguous()
        timestep_emb, embedded_timestep = self.embed_timestep(timestep, hidden_states.dtype)
        if isinstance(block_conditions[0], CrossAttentionKV):
            condition_mask_bias = None  # already expanded into each CrossAttentionKV
        blocks = list(zip(dit.transformer_blocks, block_conditions))
        full_step = True
        if step_cache is not None:
            # First-Block-Cache: run block 0; when its residual barely moved since the last full
            # step, reuse that step's residual of the remaining blocks instead of running them.
            block, condition = blocks[0]
            first_input = hidden_states
            hidden_states = block(
                hidden_states, None, condition, condition_mask_bias, timestep_emb, patch_height, patch_width
            )
            first_residual = hidden_states - first_input
            full_step = not step_cache.can_reuse(first_residual)
            if not full_step:
                hidden_states = step_cache.apply(hidden_states, timestep)
                blocks = []
            else:
                rest_input = hidden_states
                blocks = blocks[1:]
        for block, condition in blocks:
            hidden_states = block(
                hidden_states,
                None,
                condition,
                condition_mask_bias,
                timestep_emb,
                patch_height,
                patch_width,
            )
        if step_cache is not None and full_step:
            step_cache.store(first_residual, hidden_states - rest_input, timestep)
        hidden_states = dit.norm_out(hidden_states, embedded_timestep, dit.scale_shift_table)
        hidden_states = dit.proj_out(hidden_states)
        # [B, h*w, p*p*C] -> [B, C, h*p, w*p]
        hidden_states = hidden_states.reshape(batch_size, patch_height, patch_width, patch, patch, -1)
        hidden_states = hidden_states.permute(0, 5, 1, 3, 2, 4)
        return hidden_states.reshape(batch_size, -1, patch_height * patch, patch_width * patch)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] keep-mask -> [B, 1, N] additive attention bias, as SANA does."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
