"""Data-parallel training over the processes of ``accelerate launch`` (one process: a no-op).

Every process holds the whole model. The frozen MLLM and VAE are never wrapped; the trained
parts (metaquery rows, connector, DiT or its LoRA) stay plain parameters whose gradients are
averaged over the processes by one coalesced all-reduce per optimisation step (what DDP does,
without overlapping communication and backward). All processes then clip and step identically,
so the trained weights stay the same everywhere and the main process alone saves them.

Sharding: the global batch of a step is the same ``batch_size`` examples whatever the number of
processes. With ``accumulation`` micro-steps it is cut into ``accumulation`` consecutive chunks,
and each chunk into ``num_processes`` consecutive slices; process r trains slice r of each chunk.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
from accelerate import Accelerator, PartialState
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..errors import InvalidParameterError
from .sharding import is_sharded

BUCKET_ELEMENTS = 2**25  # 128 MiB of float32 gradients per all-reduce


def launched_processes() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested(option: bool) -> bool:
    """``TrainConfig.fsdp``, or ``accelerate launch --use_fsdp`` (which sets ``ACCELERATE_USE_FSDP``)."""
    return option or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _on_cpu() -> bool:
    # Without a GPU, accelerate makes a multi-process launch a gloo (MULTI_CPU) group only when told so.
    return not torch.cuda.is_available()


def launch_device(requested: str) -> str:
    """The device of this process: under a multi-GPU launch ``auto``/``cuda`` mean this rank's GPU."""
    if launched_processes() > 1 and requested in ("auto", "cuda"):
        return str(PartialState(cpu=_on_cpu()).device)
    return requested


def make_accelerator() -> Accelerator:
    """The ``accelerate`` handle of this process: set up by ``accelerate launch`` (one process otherwise).

    Mixed precision is the trainer's own bfloat16 autocast (``TrainConfig.mixed_precision``, or the
    launcher's ``--mixed_precision bf16``), so accelerate's process-wide state stays at ``no``.
    """
    return Accelerator(mixed_precision="no", cpu=_on_cpu())


def leave_process_group() -> None:
    """Close the process group of ``accelerate launch`` once training is over (a plain run has none).

    Call it after the last collective: it is local, not a barrier.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_launched_process(code: int) -> int:
    """Return ``code`` from a plain run; end a process of a multi-process launch with it at once.

    Call it when the process has written everything. The interpreter's teardown of a finished
    2-process CPU run could still abort it (SIGABRT, "terminate called without an active
    exception": a C++ thread of c10d/gloo still joinable when its owner is destroyed), even after
    ``leave_process_group``, and the launcher then reports the whole run failed though it saved
    everything: seen twice in CI. So after closing the group and flushing the logs and streams,
    such a process skips the teardown (``os._exit``).
    """
    if launched_processes() == 1:
        return code
    leave_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def is_main_process() -> bool:
    return launched_processes() == 1 or PartialState(cpu=_on_cpu()).is_main_process


class DataParallel:
    """This process's share of each global batch, and the gradient averaging across processes."""

    def __init__(self, accelerator: Accelerator, batch_size: int, accumulation: int = 1):
        self.accelerator = accelerator
        self.num_processes = accelerator.num_processes
        self.rank = accelerator.process_index
        self.batch_size = batch_size
        self.accumulation = accumulation
        share = self.num_processes * accumulation
        if accumulation < 1 or batch_size % share:
            raise InvalidParameterError(
                f"batch_size {batch_size} (the global batch per optimisation step) must be a multiple of "
                f"processes x gradient accumulation = {self.num_processes} x {accumulation} = {share}."
            )
        self.micro_size = batch_size // share  # examples per process per micro-step

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def micro_positions(self) -> list[list[int]]:
        """Per micro-step, the positions (0..batch_size-1) of the global batch this process trains."""
        chunk = self.batch_size // self.accumulation
        return [list(range(m * chunk + self.rank * self.micro_size, m * chunk + (self.rank + 1) * self.micro_size))
                for m in range(self.accumulation)]

    def average(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Average the gradients of ``params`` and the scalar ``loss`` over the processes (in place).

        Gradients travel in buckets of at most ``BUCKET_ELEMENTS`` (memory stays bounded for a full DiT).
        """
        if self.num_processes == 1:
            return float(loss)
        total = loss.detach().float().reshape(1).to(loss.device)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        # FSDP-sharded parameters (``training.sharding``) had theirs averaged in the backward pass.
        params = [param for param in params if not is_sharded(param)]
        bucket: list[torch.nn.Parameter] = []
        filled = 0
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            bucket.append(param)
            filled += param.numel()
            if filled >= BUCKET_ELEMENTS:
                self._average_bucket(bucket)
                bucket, filled = [], 0
        if bucket:
            self._average_bucket(bucket)
        return float(total) / self.num_processes

    def _average_bucket(self, params: list[torch.nn.Parameter]) -> None:
        flat = parameters_to_vector([p.grad for p in params])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.num_processes
        vector_to_parameters(flat, [p.grad for p in params])

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()
