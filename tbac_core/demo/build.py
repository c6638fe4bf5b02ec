"""Build the demo model from nothing: ``python -m tbac_core.demo.build``.

A toy that shows the whole TBAC-UniImage system work without a download -- generation, editing
and understanding -- on "a <colour> <shape> on a <colour> background" scenes at 32x32 pixels.
Steps (fixed seeds, so a rebuild with the same library versions gives the same files):

1. render the synthetic scenes (``scenes``): caption pairs and edit triples, holding some
   colour/shape/background combinations out of every job;
2. write the tiny components' configs and tokenizer into the checkpoint folder (``components``);
3. train the small DC-AE to reconstruct the training images (plain autoencoder, MSE + L1), and set
   its ``scaling_factor`` so latents have unit variance;
4. pretrain the tiny Qwen2.5-VL (vision tower and text decoder, transformers' own LM loss) to
   caption the scenes, answer questions about them, and continue TBAC's generation and edit
   prompts with the caption of the picture to draw (``questions``, ``pretrain``); then freeze it;
5. assemble an official-format checkpoint with fresh metaquery rows, connector and DiT, load it as
   a ``TBACModel``, train those with the ``Trainer`` on the caption pairs AND the edit triples, and
   write the result (``config.json`` + ``model.safetensors``) next to the component folders;
6. score the held-out combinations (``evaluate``) and record everything in ``demo_info.json``.

Options change the output folder, the budget, or the ladder mapping (``--layers final`` trains the
single-layer ablation; ``demo.ablation`` runs the whole comparison).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import DEMO_CHECKPOINT, DEMO_DEFAULTS, DEMO_NAME
from .components import (
    TBAC_SYSTEM_PROMPT,
    DemoSpec,
    build_transformer,
    build_vae,
    mllm_config,
    random_mllm_state,
    scheduler_config,
    transformer_config,
    vae_config,
    with_metaquery_rows,
    write_json,
    write_tokenizer,
)
from .questions import question_sentences
from .scenes import (
    Layout,
    render_scene,
    save_split,
    split_scenes,
    vocabulary,
    write_caption_folder,
    write_edit_folder,
)

MLLM_ID = "demo-Qwen2.5-VL"  # the official code dispatches on "Qwen2.5-VL" and "Sana" in these ids
SANA_ID = "demo-Sana_diffusers"
HELD_OUT = 24
IMAGES_PER_SCENE = 8


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, learning_rate: float, seed: int,
              log=print) -> float:
    """Train the DC-AE as a plain autoencoder on ``images`` [N, 3, H, W] in -1..1; return the final loss."""
    vae.train().requires_grad_(True)
    from .pretrain import warmup_cosine_schedule

    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = warmup_cosine_schedule(optimizer, steps, min_lr_rate=0.1)
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


def write_components(out: Path, spec: DemoSpec) -> dict:
    """Tokenizer and component configs inside ``out``; returns the Qwen2.5-VL config."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_info = write_tokenizer(out / MLLM_ID, vocabulary(), spec.spare_vocab, question_sentences(),
                                     image_pixels=spec.vision_pixels)
    qwen = mllm_config(spec, tokenizer_info["vocab_size"], tokenizer_info["ids"])
    write_json(out / MLLM_ID / "config.json", qwen)
    write_json(out / SANA_ID / "transformer" / "config.json", transformer_config(spec))
    write_json(out / SANA_ID / "scheduler" / "scheduler_config.json", scheduler_config(spec))
    return qwen


def demo_prompt_builder(components_dir: Path):
    """The PromptBuilder the demo model gets when loaded: its tokenizer, and its pictures shown at the
    preprocessor's ``min_pixels`` (``DemoSpec.vision_pixels``), as edits and understanding show them."""
    from ..loading.build import image_processor_settings, load_tokenizer
    from ..processing.prompting import PromptBuilder, make_image_processor

    settings = image_processor_settings([components_dir / MLLM_ID])
    return PromptBuilder(load_tokenizer(components_dir / MLLM_ID), make_image_processor(settings, settings["min_pixels"]),
                         None, settings)


def pretrain_stage(components_dir: Path, qwen: dict, scenes, *, spec: DemoSpec, steps: int, batch_size: int,
                   learning_rate: float, log=print) -> tuple[dict, list[float]]:
    """Random Qwen2.5-VL -> pretrained on the scenes (``demo.pretrain``); canonical-key weights + losses."""
    from .pretrain import mllm_state, pretrain_mllm, standalone_mllm

    model = standalone_mllm(qwen, random_mllm_state(qwen, spec.seed))
    if steps:
        losses = pretrain_mllm(model, demo_prompt_builder(components_dir), scenes, steps=steps,
                               batch_size=batch_size, learning_rate=learning_rate, image_size=spec.image_size,
                               seed=spec.seed + 5, log=log)
    else:
        losses = []
    return mllm_state(model), losses


def tbac_config(spec: DemoSpec) -> dict:
    return {
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
        "input_image_pixels": spec.vision_pixels,
        "system_prompt": TBAC_SYSTEM_PROMPT,
        "loss_type": "flow",
        "modules_to_freeze": ["vae", "model.mllm_backbone"],
        "modules_to_unfreeze": ["model.mllm_backbone.model.embed_tokens"],
        "torch_dtype": "float32",
    }


def train_ladder(components_dir: Path, work: Path, data_dirs: list[Path], mllm: dict, vae_state: dict, *,
                 spec: DemoSpec, seed: int, steps: int, batch_size: int, learning_rate: float, layers: str,
                 log=print):
    """Frozen pretrained MLLM + fresh metaqueries, connector and DiT (seeded by ``seed``) -> the
    ``Trainer`` on ``data_dirs``. Returns (trained TBACModel, TrainResult)."""
    from ..loading.build import load_model
    from ..modeling.dit import Connector
    from ..training import TrainConfig, Trainer
    from ..training.export import checkpoint_tensors, write_checkpoint

    torch.manual_seed(seed + 4)
    connector = Connector(spec.mllm_hidden, spec.caption_channels)
    transformer = build_transformer(DemoSpec(**{**asdict(spec), "seed": seed}))
    initial = work / "initial"
    write_checkpoint(initial, checkpoint_tensors(with_metaquery_rows(mllm, spec.num_metaqueries, seed),
                                                 connector.state_dict(), transformer.state_dict(), vae_state),
                     tbac_config(spec))
    model = load_model(initial, dtype="fp32", device="cpu", models_dirs=[components_dir], name=DEMO_NAME)
    train_config = TrainConfig(
        data=[str(d) for d in data_dirs], output_dir=str(work / "run"), dit_mode="full", layers=layers,
        max_steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=max(1, steps // 20),
        min_lr_ratio=0.1, grad_clip=1.0, seed=seed, save_every=0, sample_every=0,
        progress=sys.stderr.isatty(), log_every=0 if sys.stderr.isatty() else 250,
    )
    trainer = Trainer(model, train_config)
    log(f"Training {trainer.parts.num_trainable():,} parameters for {steps} steps of {batch_size} on "
        f"{trainer.data.describe()} (layers {layers!r} -> rungs {trainer.block_rungs})...")
    result = trainer.train()
    trainer.finish()
    shutil.rmtree(initial, ignore_errors=True)
    return model, result


def render_training_data(work: Path, train_scenes, spec: DemoSpec, images_per_scene: int) -> list[Path]:
    """Caption pairs and edit triples (``images_per_scene`` of each per training scene)."""
    captions, edits = work / "data" / "captions", work / "data" / "edits"
    write_caption_folder(captions, train_scenes, spec.image_size, images_per_scene, spec.seed)
    write_edit_folder(edits, train_scenes, spec.image_size, images_per_scene * len(train_scenes), spec.seed + 6)
    return [captions, edits]


PRETRAINED_FILE = "pretrained.safetensors"  # in the work folder: the frozen MLLM and the VAE


def read_vae_state(checkpoint_dir: Path) -> dict:
    """The DC-AE weights of a built demo checkpoint (``--vae-from``)."""
    from safetensors.torch import load_file

    from ..training.export import VAE_PREFIX

    tensors = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    return {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}


def taken_weights_record(folder: Path | None, state: dict | None) -> dict | None:
    """Where a stage's weights were taken from (``--vae-from`` / ``--mllm-from``), meaningful on any
    machine: the folder's name and a SHA-256 over the weights (keys in order, each with its tensor's
    ``fingerprint_tensor``)."""
    from ..ladder.conditioning import fingerprint_tensor

    if folder is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(fingerprint_tensor(state[key]).encode())
    return {"folder": Path(folder).name, "weights_sha256": digest.hexdigest()}


def save_pretrained_parts(path: Path, mllm: dict, vae_state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {**{"mllm." + k: v.contiguous() for k, v in mllm.items()},
               **{"vae." + k: v.contiguous() for k, v in vae_state.items()}}
    save_file(tensors, str(path))


def load_pretrained_parts(path: Path) -> tuple[dict, dict]:
    """(MLLM weights without metaquery rows, VAE weights) saved by ``save_pretrained_parts``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return ({k[5:]: v for k, v in tensors.items() if k.startswith("mllm.")},
            {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})


def build(out: Path, work: Path, *, spec: DemoSpec, steps: int, batch_size: int, learning_rate: float,
          vae_steps: int, mllm_steps: int, layers: str, evaluate_after: bool,
          images_per_scene: int = IMAGES_PER_SCENE, mllm_batch_size: int = 32, mllm_lr: float = 2e-3,
          vae_from: Path | None = None, mllm_from: Path | None = None, log=print) -> dict:
    from ..processing.images import pil_to_tensor
    from ..training.export import checkpoint_tensors, write_checkpoint

    timings: dict[str, float] = {}
    started = time.perf_counter()
    cpu_started = time.process_time()
    torch.manual_seed(spec.seed)

    # 1. data
    train_scenes, held_out = split_scenes(HELD_OUT, spec.seed)
    data_dirs = render_training_data(work, train_scenes, spec, images_per_scene)
    log(f"Rendered {images_per_scene} images and edit triples per scene for {len(train_scenes)} scenes; "
        f"{len(held_out)} combinations held out of every job.")

    # 2. components (configs + tokenizer) and the split, inside the output folder
    qwen = write_components(out, spec)
    save_split(out / "split.json", train_scenes, held_out)

    # 3. VAE
    rng = random.Random(spec.seed + 3)
    vae_images = torch.stack([pil_to_tensor(render_scene(s, spec.image_size, Layout.random(rng)))
                              for s in train_scenes for _ in range(images_per_scene)]).permute(0, 3, 1, 2) * 2 - 1
    vae = build_vae(spec)
    tick, cpu = time.perf_counter(), time.process_time()
    vae_taken = None
    if vae_from is not None:  # a demo built before with the same seed and VAE steps: the same weights
        vae_state = read_vae_state(vae_from)
        vae.load_state_dict(vae_state)
        vae_taken = taken_weights_record(vae_from, vae_state)
        vae.eval().requires_grad_(False)
        vae_loss = float("nan")
        log(f"VAE weights taken from {vae_from} instead of training them again.")
    else:
        vae_loss = train_vae(vae, vae_images, vae_steps, 32, 2e-3, spec.seed, log)
    scale = latent_scale(vae, vae_images)
    vae.register_to_config(scaling_factor=scale)
    write_json(out / SANA_ID / "vae" / "config.json", vae_config(spec, scale))
    timings["vae_seconds"], timings["vae_cpu_seconds"] = time.perf_counter() - tick, time.process_time() - cpu
    log(f"VAE trained in {timings['vae_seconds']:.0f}s (loss {vae_loss:.4f}, scaling_factor {scale:.4f}).")

    # 4. MLLM pretraining (understanding), then frozen
    tick, cpu = time.perf_counter(), time.process_time()
    mllm_taken = None
    if mllm_from is not None:  # a build's pretrained.safetensors, made with the same seed and MLLM settings
        mllm, _ = load_pretrained_parts(mllm_from)
        mllm_taken = taken_weights_record(mllm_from, mllm)
        mllm_losses = []
        log(f"Pretrained MLLM weights taken from {mllm_from} instead of training them again.")
    else:
        mllm, mllm_losses = pretrain_stage(out, qwen, train_scenes, spec=spec, steps=mllm_steps,
                                           batch_size=mllm_batch_size, learning_rate=mllm_lr, log=log)
    timings["mllm_seconds"], timings["mllm_cpu_seconds"] = time.perf_counter() - tick, time.process_time() - cpu
    mllm_final = sum(mllm_losses[-50:]) / len(mllm_losses[-50:]) if mllm_losses else None
    if mllm_losses:
        log(f"MLLM pretrained in {timings['mllm_seconds']:.0f}s (loss of the last 50 steps {mllm_final:.4f}).")
    save_pretrained_parts(work / PRETRAINED_FILE, mllm, vae.state_dict())  # what demo.ablation starts from

    # 5. ladder-side tuning: metaqueries, connector, DiT on captions AND edit triples
    tick, cpu = time.perf_counter(), time.process_time()
    model, result = train_ladder(out, work, data_dirs, mllm, vae.state_dict(), spec=spec, seed=spec.seed,
                                 steps=steps, batch_size=batch_size, learning_rate=learning_rate, layers=layers,
                                 log=log)
    timings["train_seconds"], timings["train_cpu_seconds"] = time.perf_counter() - tick, time.process_time() - cpu
    first, last = result.losses[:20], result.losses[-20:]
    log(f"Trained in {result.seconds:.0f}s; loss {sum(first) / len(first):.4f} (first 20 steps) -> "
        f"{sum(last) / len(last):.4f} (last 20).")

    defaults = dict(DEMO_DEFAULTS, layers=layers)
    final_config = {**tbac_config(spec), "demo_defaults": defaults,
                    "demo_note": "Toy model built by 'python -m tbac_core.demo.build': 32x32 coloured shapes only."}
    tensors = checkpoint_tensors(model.mllm.state_dict(), model.dit.connector.state_dict(),
                                 model.dit.transformer.state_dict(), model.vae.state_dict())
    write_checkpoint(out, tensors, final_config)

    info = {
        "spec": asdict(spec),
        "training": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "layers": layers,
                     "vae_steps": vae_steps, "vae_from": vae_taken, "mllm_from": mllm_taken,
                     "mllm_steps": mllm_steps, "mllm_batch_size": mllm_batch_size,
                     "mllm_lr": mllm_lr, "images_per_scene": images_per_scene,
                     "mllm_final_loss_mean50": mllm_final, "final_loss_mean20": sum(last) / len(last)},
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    if evaluate_after:
        from .evaluate import evaluate_all

        tick = time.perf_counter()
        info["held_out_scores"] = evaluate_all(out)
        timings["eval_seconds"] = time.perf_counter() - tick
        log(f"Held-out scores: {json.dumps(info['held_out_scores'])}")
    timings["total_seconds"] = time.perf_counter() - started
    timings["total_cpu_seconds"] = time.process_time() - cpu_started
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
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="Take the VAE weights from a demo checkpoint built with the same --seed and --vae-steps "
                             "(stage 3 is deterministic, so this only saves its time).")
    parser.add_argument("--mllm-from", type=Path, default=None,
                        help="Take the pretrained Qwen2.5-VL from a build's work/pretrained.safetensors made with the "
                             "same --seed and MLLM options (stage 4 is deterministic, so this only saves its time).")
    parser.add_argument("--mllm-steps", type=int, default=4000, help="Qwen2.5-VL pretraining steps (default 4000).")
    parser.add_argument("--mllm-batch-size", type=int, default=32)
    parser.add_argument("--mllm-lr", type=float, default=2e-3)
    parser.add_argument("--images-per-scene", type=int, default=IMAGES_PER_SCENE,
                        help=f"Rendered caption images and edit triples per training scene (default {IMAGES_PER_SCENE}).")
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
                  vae_steps=args.vae_steps, mllm_steps=args.mllm_steps, mllm_batch_size=args.mllm_batch_size,
                  mllm_lr=args.mllm_lr, images_per_scene=args.images_per_scene, layers=args.layers,
                  evaluate_after=not args.no_eval, vae_from=args.vae_from, mllm_from=args.mllm_from, log=log)
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
