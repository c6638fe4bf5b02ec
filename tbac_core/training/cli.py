"""``python -m tbac_core train``: ladder-side tuning from the command line.

    python -m tbac_core train --model models/tbac/TBAC-UniImage-3B --data my_images --out runs/cats
    python -m tbac_core train --data my_images --out runs/cats --resume latest      # continue
    python -m tbac_core train --data my_images --out runs/lora --dit lora --lora-rank 16
    python -m tbac_core train ... --export models/tbac/cats-merged    # also write a standalone checkpoint
    accelerate launch --num_processes 8 -m tbac_core train --data my_images --out runs/cats    # 8 GPUs

``--data`` folders hold images with same-named .txt captions, and/or edit triples
(``NAME_source.png`` + ``NAME.txt`` instruction + ``NAME_target.png``). The run folder gets
``checkpoint-NNNNNN/`` (resumable), ``final/`` (the trained parts: apply it on the base model with
``tbac_core.loading.adapters.apply_adapter`` or the loader) and ``samples/step-NNNNNN.png`` grids.
Under ``accelerate launch`` each process trains its slice of every global batch (--batch-size);
on a machine without GPUs add --multi_gpu (accelerate then starts gloo CPU processes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli.options import model_load_kwargs, model_options, resolve_model_dir


def add_parser(subparsers) -> None:
    """Register ``train``; argparse only, so the parser builds without torch (``--help`` stays fast)."""
    parser = subparsers.add_parser(
        "train", parents=[model_options(weights_option=False)], help="Ladder-side tuning: train metaqueries, connector and DiT on "
        "your images (the MLLM stays frozen).", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", action="append", required=True, metavar="DIR",
                      help="Folder of images + .txt captions and/or edit triples, or WebDataset tar shards "
                      "(.tar/.tar.gz files or a quoted glob such as 'shards/*.tar', streamed); repeatable.")
    data.add_argument("--out", "-o", required=True, metavar="DIR", help="Run folder (checkpoints, final, samples).")
    data.add_argument("--resolution", type=int, default=None, help="Training size in pixels (default: the model's).")
    data.add_argument("--resume", default=None, metavar="latest|DIR",
                      help="Continue from the newest checkpoint in --out ('latest') or from a checkpoint folder.")
    data.add_argument("--export", default=None, metavar="DIR",
                      help="After training, also write a standalone checkpoint (base + trained parts) here.")
    parts = parser.add_argument_group("what to train")
    parts.add_argument("--dit", choices=("full", "lora", "frozen"), default="full",
                       help="Train the DiT fully (default), with LoRA adapters (peft), or not at all.")
    parts.add_argument("--lora-rank", type=int, default=16)
    parts.add_argument("--lora-alpha", type=float, default=None, help="Default: the rank.")
    parts.add_argument("--lora-targets", default=None,
                       help="Comma-separated DiT Linear module names (default: the attention projections, "
                            "tbac_core.training.DEFAULT_LORA_TARGETS).")
    parts.add_argument("--no-metaqueries", action="store_true", help="Keep the metaquery rows fixed.")
    parts.add_argument("--no-connector", action="store_true", help="Keep the connector fixed.")
    parts.add_argument("--layers", default="default", help="Ladder mapping trained (and sampled) with; a layer "
                       "spec such as 'default' or 'final' (every block reads the last layer).")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000)
    opt.add_argument("--batch-size", type=int, default=16,
                     help="Global batch per step, over all processes of accelerate launch and accumulation.")
    opt.add_argument("--grad-accum", type=int, default=1, help="Gradient-accumulation micro-steps per step.")
    opt.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate (official: 1e-4).")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="Cosine floor as a share of --lr.")
    opt.add_argument("--warmup", type=int, default=100, help="Linear warm-up steps.")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="Gradient-norm clipping (0 = off).")
    opt.add_argument("--caption-dropout", type=float, default=0.1, help="Share of empty captions (for guidance).")
    opt.add_argument("--timestep-shift", type=float, default=None,
                     help="Flow shift of the training noise levels (default: the scheduler config's flow_shift).")
    opt.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), default="auto",
                     help="auto: bfloat16 autocast on CUDA, none on the CPU.")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="Less memory, ~30%% slower.")
    opt.add_argument("--fsdp", action="store_true",
                     help="Shard the DiT blocks' weights, gradients and optimizer state over the processes of "
                          "accelerate launch (--dit full; accelerate launch --use_fsdp on GPUs turns it on too).")
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("checkpoints and samples")
    run.add_argument("--save-every", type=int, default=500, help="Checkpoint interval in steps (0 = only final).")
    run.add_argument("--keep", type=int, default=2, help="How many checkpoints to keep (0 = all).")
    run.add_argument("--sample-every", type=int, default=500, help="Sample-grid interval in steps (0 = never).")
    run.add_argument("--sample-prompt", action="append", default=[], metavar="TEXT",
                     help="Prompt of the sample grid; repeatable (default: the first 4 captions).")
    run.add_argument("--sample-steps", type=int, default=20)
    run.add_argument("--sample-guidance", type=float, default=4.5)
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.set_defaults(handler=run_train)


def train_config_from_args(args: argparse.Namespace):
    from .trainer import TrainConfig  # torch: only when training really starts

    targets = {} if args.lora_targets is None else {
        "lora_targets": tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())}
    return TrainConfig(**targets,
        data=list(args.data), output_dir=args.out, dit_mode=args.dit, train_metaqueries=not args.no_metaqueries,
        train_connector=not args.no_connector, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        layers=args.layers,
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, min_lr_ratio=args.min_lr_ratio,
        gradient_accumulation=args.grad_accum,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        resolution=args.resolution, caption_dropout=args.caption_dropout, timestep_shift=args.timestep_shift,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp,
        seed=args.seed,
        save_every=args.save_every, keep_checkpoints=args.keep, sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt), sample_steps=args.sample_steps,
        sample_guidance=args.sample_guidance, resume=args.resume, progress=True,
    )


def load_model(args: argparse.Namespace, folder: Path):
    from ..loading import load_model

    return load_model(folder, **model_load_kwargs(args))


def run_train(ctx) -> int:
    import torch

    from ..loading import apply_adapter
    from .distributed import end_launched_process, is_main_process, launch_device, leave_process_group
    from .export import export_checkpoint
    from .trainer import Trainer

    args = ctx.args
    if args.threads:
        torch.set_num_threads(args.threads)
    config = train_config_from_args(args)
    config.validate()
    args.device = launch_device(args.device)  # under accelerate launch: this process's GPU
    if not is_main_process():
        ctx = None  # only the main process reports
    folder = resolve_model_dir(args.model)
    _log(ctx, f"Loading {folder} ...")
    model = load_model(args, folder)
    trainer = Trainer(model, config)
    _log(ctx, f"{trainer.data.describe()}; training "
              f"{trainer.parts.num_trainable():,} parameters ({', '.join(trainer.parts.named_groups())}); "
              f"rungs per DiT block {trainer.block_rungs}.")
    result = trainer.train()  # ends with every process past its last collective
    leave_process_group()
    _log(ctx, f"Done: {result.steps} steps in {result.seconds:.0f}s; trained parts in {result.final_dir}.")
    if args.export and trainer.is_main_process:
        del trainer, model
        base = load_model(args, folder)
        apply_adapter(base, result.final_dir)
        out = export_checkpoint(base, args.export, config_updates={"trained_from": str(folder)})
        _log(ctx, f"Standalone checkpoint written to {out}.")
    return end_launched_process(0)


def _log(ctx, message: str) -> None:
    if ctx is None:
        return
    log = getattr(ctx, "log", None)
    if log is not None:
        log(message)
    else:
        print(message, file=sys.stderr)
