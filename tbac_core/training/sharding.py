"""Fully sharded data parallel (PyTorch FSDP2) for full-DiT tuning.

With ``TrainConfig.fsdp`` (or ``accelerate launch --use_fsdp``) each of N processes keeps 1/N
of every DiT transformer block's weights, gradients and AdamW state; a block's weights are
gathered just for its forward and backward (``torch.distributed.fsdp.fully_shard``). The blocks
hold nearly all of the DiT (SANA-1600M: 20 blocks of ~80 M parameters each), so this is what lets
a full-DiT tuning fit where a full copy per device does not. What stays replicated is small:
the patch/time/caption embeddings, the output head, the connector and the metaquery rows; their
gradients are averaged by ``distributed.DataParallel`` as before. The frozen MLLM and VAE are
never sharded.

Saved checkpoints hold full tensors (gathered here), so a sharded run resumes with any number
of processes, sharded or not.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InvalidParameterError

logger = logging.getLogger(__name__)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor_type())


def shard_transformer_blocks(transformer: nn.Module, num_processes: int) -> bool:
    """Shard each of ``transformer.transformer_blocks`` over the processes; False when there is one."""
    if num_processes == 1:
        logger.info("FSDP asked for, but this run has one process: nothing to shard, training as usual.")
        return False
    if not torch.distributed.is_initialized():
        raise InvalidParameterError(
            "FSDP needs the process group of a multi-process launch (accelerate launch --num_processes N)."
        )
    from torch.distributed.fsdp import fully_shard

    for block in transformer.transformer_blocks:
        fully_shard(block)
    block_params = [p for block in transformer.transformer_blocks for p in block.parameters()]
    local = sum(p.to_local().numel() for p in block_params)
    logger.info("FSDP: process %d holds %d of the DiT blocks' %d parameters (%d processes).",
                torch.distributed.get_rank(), local, sum(p.numel() for p in block_params), num_processes)
    return True


def sharded_blocks(transformer: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [block for block in transformer.transformer_blocks if isinstance(block, FSDPModule)]


@contextmanager
def gathered_blocks(transformer: nn.Module):
    """The blocks' full weights in place while the body runs (inference outside a block's forward).

    Sampling reads a block's cross-attention projections before the block runs (keys/values once
    per generation), which the per-forward gathering of FSDP does not cover. Every process must
    enter this together.
    """
    blocks = sharded_blocks(transformer)
    for block in blocks:
        block.set_reshard_after_forward(False)
        block.unshard()
    try:
        yield
    finally:
        for block in blocks:
            block.reshard()
            block.set_reshard_after_forward(True)


class TrainingPlacement:
    """A ``pipeline.placement.Placement`` for sampling inside training: each part stays where the
    trainer keeps it (no moves, which would also undo FSDP's gathering); with ``sharded`` the DiT's
    blocks are gathered while the DiT runs (every process must sample together)."""

    def __init__(self, model, sharded: bool):
        self.model = model
        self.sharded = sharded

    @contextmanager
    def use(self, part: str):
        module = getattr(self.model, part)
        if part == "dit" and self.sharded:
            with gathered_blocks(module.transformer):
                yield module
        else:
            yield module


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` whole (a collective for a sharded one: every process must call it)."""
    if is_sharded(tensor):
        return tensor.full_tensor().detach().to("cpu")
    return tensor.detach().to("cpu", copy=True)


def gather_full(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """CPU copies of ``state``'s tensors, whole; every process must call it (same keys, same order).

    Only a process with ``keep`` holds the result, so the others never hold more than one gathered
    tensor at a time (the main process alone writes checkpoints).
    """
    gathered: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = full_tensor(value)
        if keep:
            gathered[key] = value
    return gathered


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as ``param``: this process's shard of it for a sharded parameter."""
    if not is_sharded(param) or full.dim() == 0:
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every process holds the full tensor (read from the checkpoint), so no scatter is needed.
    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True)`` for full tensors into possibly sharded parameters."""
    current = module.state_dict()
    module.load_state_dict({key: shard_like(value, current[key]) if key in current else value
                            for key, value in state.items()}, strict=True)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded and replicated parameters together (one global norm)."""
    sharded = [p for p in params if p.grad is not None and is_sharded(p)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    replicated = [p for p in params if p.grad is not None and not is_sharded(p)]
    sharded_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
    squares = sharded_norm.square()
    if replicated:
        squares = squares + torch.nn.utils.get_total_norm([p.grad for p in replicated]).to(squares.device).square()
    total = squares.sqrt()
    for group in (sharded, replicated):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
