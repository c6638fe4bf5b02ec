"""Ladder-side diffusion tuning: the training loop.

    from tbac_core import load_model
    from tbac_core.training import TrainConfig, Trainer
    model = load_model("models/tbac/TBAC-UniImage-3B", dtype="fp32")
    Trainer(model, TrainConfig(data=["my_images"], output_dir="runs/cats", max_steps=2000)).train()

One step: a batch of captions (and input images, for edit triples) goes through the SAME
conditioning path as inference -- ``PromptBuilder.build_batch`` with the metaquery suffix, the
frozen MLLM read at every rung (``metaquery_rung_states``, here with gradients flowing back to
the metaquery rows), a ``LadderConditioning`` mapping rungs onto DiT blocks, the connector and
caption projection per block -- and the ladder DiT predicts the flow velocity of noised target
latents (``flow.FlowMatchingObjective``).

Everything random (batch order, caption dropout, timesteps, noise) derives from (seed, step) and
is drawn for the whole global batch, so a resumed run continues exactly as if it had not stopped,
and ``accelerate launch --num_processes N`` trains on the same global batches as one process
(``training.distributed``): each process takes its slice, gradients are averaged, the main
process alone logs and saves. A checkpoint holds no per-process state, so it resumes with any N.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import InvalidParameterError, TrainingDivergedError
from ..ladder.conditioning import LadderConditioning, RungSource
from ..ladder.layer_spec import parse_layer_spec
from ..loading.adapters import read_adapter_config, read_adapter_tensors, write_adapter
from ..modeling.dit import mask_to_bias
from ..modeling.mllm import metaquery_rung_states
from ..modeling.vae import encode_images
from ..processing.prompt_layout import metaquery_positions
from .checkpoints import (
    FINAL_NAME,
    TRAINER_STATE,
    checkpoint_folder,
    gather_optimizer_state,
    latest_checkpoint,
    prune_checkpoints,
    read_optimizer_state,
    read_trainer_state,
    write_json,
    write_optimizer_state,
)
from .data import Batch, TrainingData
from .distributed import DataParallel, fsdp_requested, make_accelerator
from .flow import FlowMatchingObjective, NoiseDraws
from .parts import (
    DEFAULT_LORA_TARGETS,
    TrainableParts,
    enable_gradient_checkpointing,
    eval_mode,
)
from .sharding import TrainingPlacement, clip_grad_norm, shard_transformer_blocks
from .shards import ShardStream, is_shard_path

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (defaults follow the official recipe where it has one)."""

    data: list[str]  # folders of image/caption pairs and/or edit triples (``training.data``), or tar shards
    # (``training.shards``: .tar/.tar.gz files or glob patterns, streamed)
    output_dir: str
    # what is trained
    dit_mode: str = "full"  # full | lora | frozen
    train_metaqueries: bool = True
    train_connector: bool = True
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: = rank
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    layers: str = "default"  # which rung feeds which DiT block (a layer spec); "final" = single-layer
    # optimisation
    max_steps: int = 1000
    batch_size: int = 16  # the global batch per optimisation step (all processes and micro-steps together)
    gradient_accumulation: int = 1  # micro-steps per optimisation step
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio (official: 1e-4 -> 1e-5)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    # data
    resolution: int | None = None  # None: the model's trained size
    caption_dropout: float = 0.1  # text-to-image (official 0.1); edit triples use the official 0.2/0.2
    timestep_shift: float | None = None  # None: the scheduler config's flow_shift
    cache_latents: bool = True  # encode every target once (the VAE is frozen)
    # machinery
    mixed_precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | no
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the DiT blocks over the processes (``training.sharding``; dit_mode full)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    sample_prompts: tuple[str, ...] = ()  # empty: the first 4 distinct captions of the data
    sample_steps: int = 20
    sample_guidance: float = 4.5
    sample_seed: int = 0
    resume: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    progress: bool = True  # tqdm bar
    log_every: int = 0  # also log a line every N steps (for logs without a terminal; 0 = never)

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be >= 1"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be a positive number"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in 0..1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)"),
            (self.dit_mode in ("full", "lora", "frozen"), "dit_mode must be full, lora or frozen"),
            (self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision must be auto, bf16 or no"),
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (not self.fsdp or self.dit_mode == "full",
             "fsdp shards the full DiT: use it with dit_mode full (LoRA and frozen runs fit without it)"),
            (self.save_every >= 0 and self.sample_every >= 0, "save_every / sample_every must be >= 0 (0 = never)"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise InvalidParameterError("Invalid training settings: " + "; ".join(problems) + ".")


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # one per step run by this call
    final_dir: Path
    seconds: float
    history: list[dict] = field(default_factory=list)


def open_training_data(paths: list[str], resolution: int) -> TrainingData | ShardStream:
    """Folders of files (``TrainingData``) or tar shards (``ShardStream``); one kind per run."""
    shards = [is_shard_path(p) for p in paths]
    if all(shards):
        return ShardStream.from_paths(paths, resolution)
    if any(shards):
        raise InvalidParameterError(
            f"Training data mixes folders and tar shards ({', '.join(map(str, paths))}); use one kind per run "
            f"(training.shards.write_shards turns a folder into shards)."
        )
    return TrainingData.from_folders(paths, resolution)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


class Trainer:
    """Trains ``model`` (a ``TBACModel``, best loaded in float32 on the CPU) in place.

    ``train()`` runs to ``max_steps`` and writes ``output_dir/final`` (the trained parts). While
    training, the metaquery rows live in a separate parameter substituted by a hook; ``finish()``
    writes them into the embedding and removes the hook (then export or keep using the model).
    ``accelerator``: an ``accelerate.Accelerator`` (default: this process's, as set up by
    ``accelerate launch``; a plain run is one process).
    """

    def __init__(self, model, config: TrainConfig, data: TrainingData | ShardStream | None = None,
                 accelerator=None):
        config.validate()
        self.model = model
        self.config = config
        self.device = model.device
        self.output_dir = Path(config.output_dir)
        identity = model.identity
        self.block_rungs = parse_layer_spec(config.layers, identity.num_rungs, identity.num_dit_blocks)
        self.resolution = config.resolution or model.config.default_image_size
        if self.resolution % model.vae_scale_factor:
            raise InvalidParameterError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {model.vae_scale_factor}."
            )
        self.data = data if data is not None else open_training_data(config.data, self.resolution)
        self.accelerator = accelerator if accelerator is not None else make_accelerator()
        self.parallel = DataParallel(self.accelerator, config.batch_size, config.gradient_accumulation)
        if self.parallel.num_processes > 1 and self.accelerator.device.type != "cpu" \
                and self.device != self.accelerator.device:
            raise InvalidParameterError(
                f"Process {self.parallel.rank} has its model on {self.device}, but accelerate gave it "
                f"{self.accelerator.device}; load the model on the launcher's device (--device auto)."
            )
        self.objective = FlowMatchingObjective(model.scheduler_config, config.timestep_shift)
        self.parts = TrainableParts(
            model, dit_mode=config.dit_mode, train_metaqueries=config.train_metaqueries,
            train_connector=config.train_connector, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            lora_targets=tuple(config.lora_targets),
        )
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.sharded = fsdp_requested(config.fsdp) and config.dit_mode == "full" and \
            shard_transformer_blocks(model.dit.transformer, self.parallel.num_processes)
        self.autocast_dtype = self._autocast_dtype()
        groups = [{"params": params, "name": name} for name, params in self.parts.named_groups().items()]
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay)
        from transformers.optimization import (
            get_cosine_with_min_lr_schedule_with_warmup,
        )

        self.lr_schedule = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_ratio
        )
        self.step = 0
        self.history: list[dict] = []
        self.sample_prompts = list(config.sample_prompts) or self._default_sample_prompts()

    # -- setup helpers -----------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        choice = self.config.mixed_precision
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision
        if launcher == "fp16":
            raise InvalidParameterError("Train with --mixed_precision bf16 or no: float16 needs loss scaling, which "
                                        "this trainer does not do.")
        if choice == "auto" and launcher == "bf16":
            choice = "bf16"
        if choice == "no" or (choice == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            raise InvalidParameterError("mixed_precision bf16 needs a CUDA device; use 'no' on the CPU.")
        if not torch.cuda.is_bf16_supported():
            if choice == "bf16":
                raise InvalidParameterError("This GPU does not support bfloat16; use mixed_precision 'no'.")
            return None
        return torch.bfloat16

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _default_sample_prompts(self) -> list[str]:
        return self.data.sample_captions(4)

    @property
    def is_main_process(self) -> bool:
        return self.parallel.is_main

    # -- one step ----------------------------------------------------------------------------
    def block_conditions(self, texts: list[str], sources: list[list[Image.Image]]) -> list[torch.Tensor]:
        """Per-block DiT conditions [B, N, D] for a batch, with gradients to the trained parts."""
        model = self.model
        builder = model.prompts
        rows = [(builder.truncate_caption(text), [builder.prepare_image(img) for img in imgs])
                for text, imgs in zip(texts, sources)]
        inputs = builder.build_batch(rows, model.config.system_prompt, model.metaquery_suffix())
        positions = metaquery_positions(inputs["input_ids"], builder.ids, model.config.num_metaqueries)
        rungs = list(range(max(self.block_rungs) + 1))
        states = metaquery_rung_states(model.mllm, inputs, positions, rungs, builder.ids.image_pad,
                                       grad_enabled=True)  # [rungs, B, N, H]
        # Training has one branch; the unconditional one is learnt through caption dropout.
        source = RungSource(positive=states, negative=states, image_negative=None, prompts=tuple(texts),
                            negative_prompt="")
        cond = LadderConditioning.from_source(source, self.block_rungs, model.identity)
        return cond.block_conditions("positive", model.dit.embed_condition)

    def apply_dropout(self, batch: Batch, generator: torch.Generator) -> tuple[list[str], list[list[Image.Image]]]:
        """Unconditional examples for classifier-free guidance, as the official data pipeline.

        Text-to-image: the caption becomes "" with probability ``caption_dropout``. Edits: one draw
        u per example; caption "" if u < 0.2, input images black if 0.1 <= u < 0.3.
        """
        return self._dropout(batch, torch.rand(len(batch.texts), generator=generator).tolist())

    def _dropout(self, batch: Batch, draws: list[float]) -> tuple[list[str], list[list[Image.Image]]]:
        texts, sources = [], []
        for text, imgs, u in zip(batch.texts, batch.sources, draws):
            if imgs:
                texts.append("" if u < 0.2 else text)
                sources.append([Image.new("RGB", img.size) for img in imgs] if 0.1 <= u < 0.3 else imgs)
            else:
                texts.append("" if u < self.config.caption_dropout else text)
                sources.append(imgs)
        return texts, sources

    def target_latents(self, batch: Batch) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device)
        with torch.no_grad():
            return encode_images(self.model.vae, batch.targets).to(self.device)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.model.vae_scale_factor
        return (self.model.latent_channels, side, side)

    def loss_for(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Loss of ``batch`` with its dropout and noise drawn from ``generator`` (as one step does)."""
        dropout = torch.rand(len(batch.texts), generator=generator).tolist()
        return self._loss(batch, dropout, self.objective.draw(len(batch.texts), self.latent_shape(), generator))

    def _loss(self, batch: Batch, dropout: list[float], noise: NoiseDraws) -> torch.Tensor:
        texts, sources = self._dropout(batch, dropout)
        noised = self.objective.apply(self.target_latents(batch), noise)
        dit = self.model.dit
        with self._autocast():
            conditions = self.block_conditions(texts, sources)
            mask = torch.ones(len(texts), self.model.config.num_metaqueries, dtype=torch.long, device=self.device)
            prediction = dit(noised.noisy, noised.timesteps, conditions, mask_to_bias(mask, dit.dtype))
        return self.objective.loss(prediction, noised.target)

    def train_step(self) -> dict:
        """One optimisation step on the global batch of ``self.step``: this process's micro-batches,
        gradients averaged over the processes, then the same clip and update everywhere."""
        config = self.config
        generator = _step_generator(config.seed, self.step)
        dropout = torch.rand(config.batch_size, generator=generator)  # [B] for the whole global batch
        noise = self.objective.draw(config.batch_size, self.latent_shape(), generator)
        micro_steps = self.parallel.micro_positions()
        local_loss = torch.zeros((), device=self.device)
        for positions in micro_steps:
            batch = self.data.batch_for(self.step, config.batch_size, config.seed, positions)
            loss = self._loss(batch, dropout[positions].tolist(), noise.select(positions))
            self.accelerator.backward(loss / len(micro_steps))
            local_loss = local_loss + loss.detach()
        params = self.parts.parameters()
        loss_value = self.parallel.average(params, local_loss / len(micro_steps))
        if not math.isfinite(loss_value):
            self._diverged("loss", loss_value)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(clip_grad_norm(params, max_norm))
        if not math.isfinite(grad_norm):
            self._diverged("gradient norm", grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "grad_norm": grad_norm,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(record)
        return record

    def _diverged(self, what: str, value: float) -> None:
        saved = self.latest_checkpoint()
        where = f" The last checkpoint is {saved}; resume from it with a lower learning rate." if saved else ""
        raise TrainingDivergedError(
            f"Training stopped at step {self.step + 1}: the {what} is {value}. Lower the learning rate (now "
            f"{self.config.learning_rate}), keep gradient clipping on (grad_clip {self.config.grad_clip}), train in "
            f"float32 or bfloat16 rather than float16, and check the data for broken images.{where}"
        )

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config = self.config
        main = self.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if config.cache_latents and isinstance(self.data, TrainingData) and self.data.latents is None:
            logger.info("Encoding %d target images once (the VAE is frozen)...", len(self.data))
            self.data.cache_latents(lambda images: encode_images(self.model.vae, images))
        if config.resume:
            self.resume(config.resume)
        self.model.dit.train()
        started = time.perf_counter()
        losses: list[float] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", disable=not config.progress,
                   desc="train", dynamic_ncols=True) if main else None
        try:
            while self.step < config.max_steps:
                record = self.train_step()
                losses.append(record["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", grad=f"{record['grad_norm']:.2f}",
                                    lr=f"{record['lr']:.2e}", refresh=False)
                if main and config.log_every and self.step % config.log_every == 0:
                    recent = losses[-config.log_every:]
                    logger.info("step %d/%d: loss %.4f (mean of last %d), grad norm %.3f, lr %.2e", self.step,
                                config.max_steps, sum(recent) / len(recent), len(recent), record["grad_norm"],
                                record["lr"])
                if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                    self.save_checkpoint()
                if config.sample_every and self.step % config.sample_every == 0:
                    self.save_samples()
        finally:
            if bar is not None:
                bar.close()
        final_dir = self.output_dir / FINAL_NAME
        self.save_adapter(final_dir)
        if main:
            write_json(final_dir / TRAINER_STATE, self._trainer_state())
        if config.sample_every and self.step % config.sample_every:
            self.save_samples()
        self.parallel.wait()
        return TrainResult(self.step, losses, final_dir, time.perf_counter() - started, list(self.history))

    def finish(self) -> None:
        """Leave the in-memory model trained and hook-free (metaquery rows written back)."""
        self.parts.finish()
        self.model.dit.eval()

    # -- saving ------------------------------------------------------------------------------
    def save_adapter(self, folder: Path) -> Path:
        """Write the trained parts to ``folder`` (main process; with FSDP every process must call it)."""
        if not (self.sharded or self.is_main_process):
            return folder
        tensors = self.parts.state_dict(keep=self.is_main_process)
        if not self.is_main_process:
            return folder
        config = self.parts.adapter_config()
        config["layers"] = self.config.layers
        config["training"] = {"step": self.step, "max_steps": self.config.max_steps,
                              "resolution": self.resolution, "data": [str(d) for d in self.config.data]}
        write_adapter(folder, tensors, config)
        return folder

    def _trainer_state(self) -> dict:
        config = asdict(self.config)
        # The data position is global (examples_seen of the global batches), not per process.
        return {"step": self.step, "examples_seen": self.step * self.config.batch_size,
                "num_processes": self.parallel.num_processes, "config": config,
                "lr_schedule": self.lr_schedule.state_dict(), "history_tail": self.history[-100:]}

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-NNNNNN``: the adapter files + optimizer state + trainer state.

        Written by the main process only (every process holds the same state, or with FSDP its shard
        of it, gathered here); the others wait.
        """
        folder = checkpoint_folder(self.output_dir, self.step)
        self.save_adapter(folder)
        if self.sharded or self.is_main_process:
            tensors, meta = gather_optimizer_state(self.optimizer, keep=self.is_main_process)
        if self.is_main_process:
            write_optimizer_state(folder, tensors, meta)
            write_json(folder / TRAINER_STATE, self._trainer_state())  # written last: marks it complete
            prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        self.parallel.wait()
        return folder

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def resume(self, where: str) -> None:
        folder = self.latest_checkpoint() if where == "latest" else Path(where)
        if folder is None:
            logger.info("No checkpoint in %s yet; starting from step 0.", self.output_dir)
            return
        state = read_trainer_state(folder)
        saved = state.get("config", {})
        for key in ("batch_size", "seed", "layers", "max_steps"):
            if key in saved and saved[key] != getattr(self.config, key):
                logger.warning("Resuming with %s=%r (checkpoint used %r): batches/schedule will differ.",
                               key, getattr(self.config, key), saved[key])
        self.parts.load_state_dict(read_adapter_tensors(folder), read_adapter_config(folder), str(folder))
        self.optimizer.load_state_dict(read_optimizer_state(folder, self.optimizer))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step = int(state["step"])
        self.history = list(state.get("history_tail", []))
        logger.info("Resumed from %s at step %d.", folder, self.step)

    # -- samples -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, prompts: list[str]) -> list[Image.Image]:
        from ..pipeline.tbac_pipeline import TBACPipeline

        # No caches: training changes the metaquery rows, which every row's states depend on.
        pipe = TBACPipeline(self.model, cache_size=0, guidance_cache_size=0,
                            placement=TrainingPlacement(self.model, self.sharded))
        with eval_mode(self.model.dit), self._autocast():
            output = pipe.generate(prompts, width=self.resolution, height=self.resolution,
                                   steps=self.config.sample_steps, guidance_scale=self.config.sample_guidance,
                                   seed=self.config.sample_seed, layers=self.config.layers)
        return output.images

    def save_samples(self) -> Path | None:
        """Sample images of ``sample_prompts`` (main process; with FSDP every process must call it)."""
        if not self.sample_prompts or not (self.sharded or self.is_main_process):
            return None
        images = self.sample_images(self.sample_prompts)
        if not self.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(path)
        (path.with_suffix(".txt")).write_text("\n".join(self.sample_prompts) + "\n", encoding="utf-8")
        return path

def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
