"""Build the demo model from nothing: ``python -m tbac_core.demo.build``.

A toy that shows the whole TBAC-UniImage system work without a download: a random, frozen tiny
Qwen2.5-VL reads the prompt, and ladder-side tuning (``tbac_core.training``) teaches the
metaqueries, connector and a small ladder DiT to paint "a <colour> <shape> on a <colour>
background" at 32x32 pixels. Steps (fixed seeds, so a rebuild with the same library versions
gives the same files):

1. render the synthetic scenes (``scenes``), holding some colour/shape/background combinations out;
2. write the tiny components' configs and tokenizer into the checkpoint folder (``components``);
3. train the small DC-AE to reconstruct the training images (plain autoencoder, MSE + L1), and set
   its ``scaling_factor`` so latents have unit variance;
4. assemble an untrained official-format checkpoint, load it as a ``TBACModel``, train it with the
   ``Trainer``, and write the result (``config.json`` + ``model.safetensors``) next to the
   component folders;
5. score the held-out combinations (``evaluate``) and record everything in ``demo_info.json``.

Options change the output folder, the budget, or the ladder mapping (``--layers final`` trains the
single-layer ablation).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import DEMO_CHECKPOINT, DEMO_DEFAULTS
from .components import (
    TBAC_SYSTEM_PROMPT,
    DemoSpec,
    build_transformer,
    build_vae,
    init_mllm_state,
    mllm_config,
    scheduler_config,
    transformer_config,
    vae_config,
    write_json,
    write_tokenizer,
)
from .scenes import (
    Layout,
    render_scene,
    save_split,
    split_scenes,
    vocabulary,
    write_caption_folder,
)

MLLM_ID = "demo-Qwen2.5-VL"  # the official code dispatches on "Qwen2.5-VL" and "Sana" in these ids
SANA_ID = "demo-Sana_diffusers"
HELD_OUT = 24
IMAGES_PER_SCENE = 8


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, learning_rate: float, seed: int,
              log=print) -> float:
    """Train the DC-AE as a plain autoencoder on ``images`` [N, 3, H, W] in -1..1; return the final loss."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, cosine down to 10 %
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        recon = vae.decode(vae.encode(batch).latent).sample
        loss = ((recon - batch) ** 2).mean() + (recon - batch).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  vae step {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return loss.item()


@torch.no_grad()
def latent_scale(vae, images: torch.Tensor) -> float:
    """1 / std of the latents: the ``scaling_factor`` that gives the DiT unit-variance latents."""
    latents = torch.cat([vae.encode(images[i: i + 256]).latent for i in range(0, len(images), 256)])
    return float(1.0 / latents.float().std())


def build(out: Path, work: Path, *, spec: DemoSpec, steps: int, batch_size: int, learning_rate: float,
          vae_steps: int, layers: str, evaluate_after: bool, images_per_scene: int = IMAGES_PER_SCENE,
          log=print) -> dict:
    from ..loading.build import load_model
    from ..modeling.dit import Connector
    from ..processing.images import pil_to_tensor
    from ..training import TrainConfig, Trainer
    from ..training.export import checkpoint_tensors, write_checkpoint

    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(spec.seed)

    # 1. data
    train_scenes, held_out = split_scenes(HELD_OUT, spec.seed)
    data_dir = work / "data"
    count = write_caption_folder(data_dir, train_scenes, spec.image_size, images_per_scene, spec.seed)
    log(f"Rendered {count} training images of {len(train_scenes)} scenes; {len(held_out)} combinations held out.")

    # 2. components (configs + tokenizer), inside the output folder
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_info = write_tokenizer(out / MLLM_ID, vocabulary(), spec.spare_vocab)
    qwen = mllm_config(spec, tokenizer_info["vocab_size"], tokenizer_info["ids"])
    write_json(out / MLLM_ID / "config.json", qwen)
    write_json(out / SANA_ID / "transformer" / "config.json", transformer_config(spec))
    write_json(out / SANA_ID / "scheduler" / "scheduler_config.json", scheduler_config(spec))

    # 3. VAE
    rng = random.Random(spec.seed + 3)
    vae_images = torch.stack([pil_to_tensor(render_scene(s, spec.image_size, Layout.random(rng)))
                              for s in train_scenes for _ in range(images_per_scene)]).permute(0, 3, 1, 2) * 2 - 1
    vae = build_vae(spec)
    tick = time.perf_counter()
    vae_loss = train_vae(vae, vae_images, vae_steps, 32, 2e-3, spec.seed, log)
    scale = latent_scale(vae, vae_images)
    vae.register_to_config(scaling_factor=scale)
    write_json(out / SANA_ID / "vae" / "config.json", vae_config(spec, scale))
    timings["vae_seconds"] = time.perf_counter() - tick
    log(f"VAE trained in {timings['vae_seconds']:.0f}s (loss {vae_loss:.4f}, scaling_factor {scale:.4f}).")

    # 4. initial checkpoint -> Trainer -> final checkpoint
    torch.manual_seed(spec.seed + 4)
    connector = Connector(spec.mllm_hidden, spec.caption_channels)
    transformer = build_transformer(spec)
    config = {
        "architectures": ["TBACUniImage"],
        "mllm_id": MLLM_ID,
        "diffusion_model_id": SANA_ID,
        "vae_id": SANA_ID,
        "scheduler_id": SANA_ID,
        "noise_scheduler_id": SANA_ID,
        "num_metaqueries": spec.num_metaqueries,
        "input_size": spec.latent_size,
        "in_channels": spec.latent_channels,
        "vae_downsample_f": spec.vae_factor,
        "max_input_text_tokens": 256,
        "system_prompt": TBAC_SYSTEM_PROMPT,
        "loss_type": "flow",
        "modules_to_freeze": ["vae", "model.mllm_backbone"],
        "modules_to_unfreeze": ["model.mllm_backbone.model.embed_tokens"],
        "torch_dtype": "float32",
    }
    initial = work / "initial"
    write_checkpoint(initial, checkpoint_tensors(
        init_mllm_state(qwen, spec.num_metaqueries, spec.seed), connector.state_dict(),
        transformer.state_dict(), vae.state_dict()), config)
    model = load_model(initial, dtype="fp32", device="cpu", models_dirs=[out], name="demo")
    train_config = TrainConfig(
        data=[str(data_dir)], output_dir=str(work / "run"), dit_mode="full", layers=layers,
        max_steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=max(1, steps // 20),
        min_lr_ratio=0.1, grad_clip=1.0, seed=spec.seed, save_every=0, sample_every=0,
        progress=sys.stderr.isatty(), log_every=0 if sys.stderr.isatty() else 250,
    )
    trainer = Trainer(model, train_config)
    log(f"Training {trainer.parts.num_trainable():,} parameters for {steps} steps of {batch_size} "
        f"(layers {layers!r} -> rungs {trainer.block_rungs})...")
    result = trainer.train()
    trainer.finish()
    timings["train_seconds"] = result.seconds
    log(f"Trained in {result.seconds:.0f}s; loss {sum(result.losses[:20]) / 20:.4f} (first 20 steps) -> "
        f"{sum(result.losses[-20:]) / 20:.4f} (last 20).")

    defaults = dict(DEMO_DEFAULTS, layers=layers)
    final_config = {**config, "demo_defaults": defaults,
                    "demo_note": "Toy model built by 'python -m tbac_core.demo.build': 32x32 coloured shapes only."}
    tensors = checkpoint_tensors(model.mllm.state_dict(), model.dit.connector.state_dict(),
                                 model.dit.transformer.state_dict(), model.vae.state_dict())
    write_checkpoint(out, tensors, final_config)
    save_split(out / "split.json", train_scenes, held_out)

    info = {
        "spec": asdict(spec),
        "training": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "layers": layers,
                     "vae_steps": vae_steps, "images": count, "final_loss_mean20": sum(result.losses[-20:]) / 20},
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    if evaluate_after:
        from .evaluate import score_held_out

        tick = time.perf_counter()
        score = score_held_out(out, layers=layers)
        timings["eval_seconds"] = time.perf_counter() - tick
        info["held_out_score"] = score.summary()
        log(f"Held-out prompts: {score.summary()}")
    timings["total_seconds"] = time.perf_counter() - started
    write_json(out / "demo_info.json", info)
    return info


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbac_core.demo.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT,
                        help=f"Checkpoint folder to write (default: the packaged demo, {DEMO_CHECKPOINT}).")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the rendered data and the training "
                        "run (default: a temporary folder, removed afterwards).")
    parser.add_argument("--steps", type=int, default=4000, help="DiT training steps (default 4000).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (default 1e-3: the DiT starts "
                        "from random weights, unlike the official fine-tuning of a pretrained SANA at 1e-4).")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--layers", default="default",
                        help="Ladder mapping to train (default 'default'; 'final' = every block reads the final "
                             "layer, the single-layer ablation).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-eval", action="store_true", help="Skip scoring the held-out prompts.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    spec = DemoSpec(seed=args.seed)
    common = dict(spec=spec, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                  vae_steps=args.vae_steps, layers=args.layers, evaluate_after=not args.no_eval, log=log)
    # Build next to the target and swap at the end: a failed build leaves the old model intact.
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if args.work is not None:
        info = build(staging, args.work, **common)
    else:
        with tempfile.TemporaryDirectory(prefix="tbac-demo-") as work:
            info = build(staging, Path(work), **common)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    log(f"Wrote {args.out}.")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
