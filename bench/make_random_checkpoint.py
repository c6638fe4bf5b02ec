#!/usr/bin/env python3
"""Random-weight TBAC-UniImage models of a given size, in the official checkpoint format or in memory.

Speed and memory do not depend on what the weights are, so benchmarks use random weights in the
published layout instead of a 11.4 GB download. Three sizes:

* ``tiny``: the architecture of the shared test fixture (``shared/fixtures/tbac-tiny``), 64x64 images.
* ``medium``: large enough that compute dominates on a CPU (Qwen2.5-VL text 768 x 10 layers, SANA
  DiT 8 blocks x 640, a 6-stage DC-AE), 256x256 images, 138 M parameters, a 0.44 GB file.
* ``medium-bf16``: ``medium`` with every part stored in bfloat16 (as the real release), 0.28 GB.
* ``real``: the published TBAC-UniImage-3B architecture (``tbac_core.loading.builtin_configs``), 512x512
  images, 5.68 B parameters, 11.4 GB in bf16 (``cpu_real_bench.py`` runs it on a CPU with 24 GB of
  RAM; ``gpu_bench.py`` builds it straight on the GPU).
* ``tiny-real-vocab``: the tiny architecture with the real vocabulary (151,936 rows), the real
  special-token ids, a real-size tokenizer and Qwen2.5-VL's preprocessor settings: what ``real``
  writes around its weights, at a size CI can afford (edits and understanding run in a second).

A checkpoint folder is what ``TencentBAC/TBAC-UniImage-3B`` ships: ``config.json`` (model_type
``tbacuniimage``) and ``model.safetensors`` (or shards + index) with keys
``model.mllm_backbone.model.*`` / ``model.mllm_backbone.visual.*`` (transformers <=4.51 layout, as
released), ``model.connector.{0,2,3}.*``, ``model.transformer.*``, ``vae.*``; the MLLM embedding has
vocab + num_metaqueries + 2 rows and there is no ``lm_head`` key. The component folders (MLLM config
with the fixture's small tokenizer, SANA transformer/vae/scheduler configs) are written beside it,
where the core's resolver looks:

    bench/models/<size>/checkpoint/                      config.json, model*.safetensors
    bench/models/<size>/bench-<size>-Qwen2.5-VL-Instruct/ config.json, tokenizer files
    bench/models/<size>/bench-<size>-Sana_diffusers/      transformer/ vae/ scheduler/ configs

``tiny`` and ``medium`` use the fixture's byte-level BPE (342 tokens, the fixture's ids): prompts come
out ~3-4x more tokens than with Qwen's real tokenizer. ``real`` and ``tiny-real-vocab`` use Qwen2.5's
ids (151643 <|endoftext|>, 151644 <|im_start|>, 151645 <|im_end|>, 151652/151653 vision start/end,
151655 <|image_pad|>, 151656 <|video_pad|>) with ``--tokenizer DIR`` (a real Qwen2.5 tokenizer
folder, e.g. ComfyUI's ``comfy/text_encoders/qwen25_tokenizer``) or, without it, a synthetic
byte-level BPE of the real size (``real_tokenizer.py``), and Qwen2.5-VL's preprocessor settings
(min_pixels 3136, max_pixels 12845056, patch 14, merge 2, temporal 2). Every written MLLM folder
is checked: its tokenizer's ids must equal its config's.

Usage: python bench/make_random_checkpoint.py {tiny,medium,medium-bf16,real,tiny-real-vocab}
       [--out bench/models] [--seed 0] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "bench")):  # run as a script from anywhere: tbac_core lives in the repo root
    if _path not in sys.path:
        sys.path.insert(0, _path)

import real_tokenizer as rt
import torch

from tbac_core.loading import builtin_configs

DEFAULT_FIXTURES = Path(os.environ.get("TBAC_FIXTURES") or REPO / "tests" / "fixtures")
DEFAULT_OUT = REPO / "bench" / "models"
TINY_QWEN = "tiny-Qwen2.5-VL-Instruct"
TINY_SANA = "tiny-Sana_diffusers"
# Small files of the fixture's MLLM folder that make a tokenizer + image processor (no weights).
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("added_tokens.json", "chat_template.json", "generation_config.json", "merges.txt",
                   "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json")
# Token ids the MLLM config must agree on with the tokenizer (image placement, M-RoPE).
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                   "vision_token_id", "image_token_id", "video_token_id")
MAX_SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained (the release is sharded this way)
EMBED_STD = 0.02  # Qwen's initializer_range, for the embedding rows


@dataclass(frozen=True)
class RandomSpec:
    """Architecture of one random model: component configs + TBAC config fields + stored dtypes."""

    name: str
    mllm: dict  # Qwen2.5-VL config.json (released, flat layout)
    transformer: dict  # SanaTransformer2DModel config
    vae: dict  # AutoencoderDC config
    scheduler: dict
    num_metaqueries: int
    input_size: int  # latent side: images are input_size * vae_downsample_f pixels square
    # dtype each component is stored in (the official save_pretrained keeps the DiT in bfloat16)
    storage: dict = field(default_factory=lambda: {"mllm": "float32", "connector": "float32",
                                                   "dit": "bfloat16", "vae": "float32"})
    # False: the fixture's tokenizer + preprocessor; True: a real-size Qwen2.5 tokenizer + Qwen's settings
    real_tokenizer: bool = False

    @property
    def vae_downsample_f(self) -> int:
        return 2 ** (len(self.vae["encoder_block_out_channels"]) - 1)

    @property
    def image_size(self) -> int:
        return self.input_size * self.vae_downsample_f

    @property
    def embedding_rows(self) -> int:
        return self.mllm["vocab_size"] + self.num_metaqueries + 2

    @property
    def qwen_folder(self) -> str:
        return f"bench-{self.name}-Qwen2.5-VL-Instruct"

    @property
    def sana_folder(self) -> str:
        return f"bench-{self.name}-Sana_diffusers"

    def tbac_config(self, max_input_text_tokens: int = 256) -> dict:
        """The checkpoint's config.json, shaped like the released one (ids relative to the folder)."""
        return {
            "architectures": ["TBACUniImage"],
            "model_type": "tbacuniimage",
            "mllm_id": self.qwen_folder,
            "diffusion_model_id": self.sana_folder,
            "vae_id": self.sana_folder,
            "scheduler_id": self.sana_folder,
            "noise_scheduler_id": self.sana_folder,
            "num_metaqueries": self.num_metaqueries,
            "input_size": self.input_size,
            "in_channels": self.transformer["in_channels"],
            "vae_downsample_f": self.vae_downsample_f,
            "max_input_text_tokens": max_input_text_tokens,
            "loss_type": "flow",
            "system_prompt": ("You will be given an image or its caption. Please describe the content of the "
                              "image in detail in your own words."),
            "modules_to_freeze": ["vae", "model.mllm_backbone"],
            "modules_to_unfreeze": ["model.mllm_backbone.model.embed_tokens"],
            "torch_dtype": self.storage["mllm"],
        }


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _with_fixture_token_ids(mllm: dict, fixture_qwen: dict, vocab_size: int) -> dict:
    config = json.loads(json.dumps(mllm))
    config.update({name: fixture_qwen[name] for name in TOKEN_ID_FIELDS})
    config["vocab_size"] = vocab_size
    return config


def make_spec(name: str, fixtures: Path = DEFAULT_FIXTURES) -> RandomSpec:
    """The spec of ``tiny``, ``medium`` or ``real`` (the fixture supplies the tokenizer's token ids)."""
    root = Path(fixtures) / "tbac-tiny"
    fixture_qwen = _load_json(root / TINY_QWEN / "config.json")
    sana = root / TINY_SANA
    if name == "tiny":
        return RandomSpec(
            name="tiny",
            mllm=fixture_qwen,
            transformer=_load_json(sana / "transformer" / "config.json"),
            vae=_load_json(sana / "vae" / "config.json"),
            scheduler=_load_json(sana / "scheduler" / "scheduler_config.json"),
            num_metaqueries=8,
            input_size=8,
        )
    if name == "medium":
        mllm = _with_fixture_token_ids(builtin_configs.QWEN25_VL_3B_CONFIG, fixture_qwen, fixture_qwen["vocab_size"])
        mllm.update(hidden_size=768, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=12,
                    num_key_value_heads=2, max_position_embeddings=4096, torch_dtype="float32",
                    rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})  # head dim 64
        mllm["vision_config"].update(depth=4, hidden_size=256, intermediate_size=684, num_heads=4,
                                     out_hidden_size=768, fullatt_block_indexes=[1, 3])
        transformer = dict(builtin_configs.SANA_1600M_512_TRANSFORMER_CONFIG)
        transformer.update(num_layers=8, num_attention_heads=20, attention_head_dim=32,  # 640 wide
                           num_cross_attention_heads=10, cross_attention_head_dim=64, cross_attention_dim=640,
                           caption_channels=1024, sample_size=8)
        vae = json.loads(json.dumps(builtin_configs.DCAE_F32C32_CONFIG))
        channels = [32, 64, 128, 256, 256, 512]
        vae.update(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                   encoder_layers_per_block=[1, 1, 1, 1, 1, 1], decoder_layers_per_block=[1, 2, 2, 2, 2, 2],
                   attention_head_dim=32)
        return RandomSpec("medium", mllm, transformer, vae, dict(builtin_configs.SANA_FLOW_DPM_SCHEDULER_CONFIG),
                          num_metaqueries=64, input_size=8)
    if name == "medium-bf16":  # the medium architecture stored all in bfloat16, as the real release is
        medium = make_spec("medium", fixtures)
        return RandomSpec("medium-bf16", medium.mllm, medium.transformer, medium.vae, medium.scheduler,
                          medium.num_metaqueries, medium.input_size,
                          storage={part: "bfloat16" for part in ("mllm", "connector", "dit", "vae")})
    if name == "tiny-real-vocab":
        mllm = json.loads(json.dumps(fixture_qwen))
        real = builtin_configs.QWEN25_VL_3B_CONFIG
        mllm.update({key: real[key] for key in (*TOKEN_ID_FIELDS, "vocab_size")})
        tiny = make_spec("tiny", fixtures)
        return RandomSpec("tiny-real-vocab", mllm, tiny.transformer, tiny.vae, tiny.scheduler,
                          num_metaqueries=tiny.num_metaqueries, input_size=tiny.input_size, real_tokenizer=True)
    if name == "real":
        return RandomSpec(
            name="real",
            mllm=json.loads(json.dumps(builtin_configs.QWEN25_VL_3B_CONFIG)),  # Qwen2.5-VL-3B's own token ids
            real_tokenizer=True,
            transformer=dict(builtin_configs.SANA_1600M_512_TRANSFORMER_CONFIG),
            vae=json.loads(json.dumps(builtin_configs.DCAE_F32C32_CONFIG)),
            scheduler=dict(builtin_configs.SANA_FLOW_DPM_SCHEDULER_CONFIG),
            num_metaqueries=64,
            input_size=16,
            storage={"mllm": "bfloat16", "connector": "bfloat16", "dit": "bfloat16", "vae": "bfloat16"},
        )
    raise ValueError(f"Unknown size {name!r}; choose one of {', '.join(SPEC_NAMES)}.")


SPEC_NAMES = ("tiny", "medium", "medium-bf16", "real", "tiny-real-vocab")


# -- modules on the meta device ------------------------------------------------------------------
def meta_modules(spec: RandomSpec) -> dict[str, torch.nn.Module]:
    """The four components built on the meta device, as the loader builds them (no memory used)."""
    from tbac_core.modeling.meta_init import empty_weights
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from tbac_core.modeling.dit import Connector
    from tbac_core.modeling.mllm import build_mllm, text_model

    mllm, base_vocab = build_mllm(spec.mllm, spec.embedding_rows)
    assert base_vocab == spec.mllm["vocab_size"]
    with empty_weights():
        transformer = SanaTransformer2DModel.from_config(spec.transformer)
        connector = Connector(text_model(mllm).norm.weight.shape[0], transformer.config.caption_channels)
        vae = AutoencoderDC.from_config(spec.vae)
    return {"mllm": mllm, "connector": connector, "dit": transformer, "vae": vae}


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, device, generator) -> torch.Tensor:
    """A tensor whose scale keeps activations finite and O(1) through a deep random network.

    Norm weights 1, biases 0, weights N(0, 1/fan_in) (variance preserving), embeddings N(0, 0.02),
    SANA's scale-shift tables N(0, 1/width) as diffusers initialises them.
    """
    from tbac_core.modeling.dit import CONNECTOR_NORM_INIT

    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1 and leaf == "weight":
        value = CONNECTOR_NORM_INIT if key == "connector.3.weight" else 1.0
        return torch.full(shape, value, dtype=dtype, device=device)
    if "scale_shift_table" in key:
        std = 1.0 / math.sqrt(shape[-1])
    elif "embed_tokens" in key:
        std = EMBED_STD
    elif len(shape) >= 2:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
    else:
        std = 1.0
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def checkpoint_key(component: str, key: str) -> str:
    """A module key -> its key in the released checkpoint (Qwen keys in the <=4.51 layout)."""
    from tbac_core.loading.checkpoint import COMPONENT_PREFIXES
    from tbac_core.modeling.mllm import canonical_key

    if component == "mllm":
        key = canonical_key(key)
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
    return COMPONENT_PREFIXES[component] + key


def tensor_plan(spec: RandomSpec) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(component, module key, checkpoint key, shape)`` for every stored tensor, in file order."""
    plan = []
    for component, module in meta_modules(spec).items():
        for key, value in module.state_dict().items():
            plan.append((component, key, checkpoint_key(component, key), tuple(value.shape)))
    return plan


def _plan_component_key(component: str, key: str) -> str:
    # The connector norm is "3.weight" inside the Connector; the init rule needs the component name.
    return f"connector.{key}" if component == "connector" else key


# -- a checkpoint folder on disk ----------------------------------------------------------------
def write_checkpoint(spec: RandomSpec, out_root: Path = DEFAULT_OUT, seed: int = 0,
                     fixtures: Path = DEFAULT_FIXTURES, max_shard_bytes: int = MAX_SHARD_BYTES,
                     tokenizer: Path | None = None) -> Path:
    """Write ``out_root/<spec.name>/`` (checkpoint + component folders); return the checkpoint folder.

    Tensors are drawn on the CPU from one seeded generator in file order (so a rebuild gives the
    same bytes) and written one shard at a time, so memory stays below one shard. ``tokenizer``:
    a real Qwen2.5 tokenizer folder for the specs with ``real_tokenizer`` (default: synthetic).
    The component folders are written and checked first, before any weight.
    """
    from safetensors.torch import save_file

    root = Path(out_root) / spec.name
    checkpoint = root / "checkpoint"
    if root.exists():
        shutil.rmtree(root)
    checkpoint.mkdir(parents=True)
    write_components(spec, root, Path(fixtures), tokenizer)

    plan = tensor_plan(spec)
    dtypes = {c: getattr(torch, spec.storage[c]) for c in spec.storage}
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[3]) * dtypes[entry[0]].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    generator = torch.Generator("cpu").manual_seed(seed)
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for component, key, ckpt_key, shape in shard:
            tensor = random_tensor(_plan_component_key(component, key), shape, torch.float32, "cpu", generator)
            tensors[ckpt_key] = tensor.to(dtypes[component])
            weight_map[ckpt_key] = name
            total += tensors[ckpt_key].numel() * tensors[ckpt_key].element_size()
        save_file(tensors, str(checkpoint / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (checkpoint / "config.json").write_text(json.dumps(spec.tbac_config(), indent=2) + "\n")
    return checkpoint


def write_tokenizer_folder(spec: RandomSpec, folder: Path, fixtures: Path = DEFAULT_FIXTURES,
                           tokenizer: Path | None = None) -> dict:
    """Tokenizer + preprocessor files of ``spec`` into ``folder``, checked against ``spec.mllm``.

    Returns where the tokenizer came from and its structure ids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if spec.real_tokenizer:
        origin = rt.copy_tokenizer(tokenizer, folder) if tokenizer else rt.write_synthetic_tokenizer(folder)
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(rt.QWEN25_VL_PREPROCESSOR, indent=2) + "\n")
        # As the release has it: transformers 4.5x's Qwen2.5-VL processor (the official code's) reads its
        # chat template from this file only, not from tokenizer_config.json.
        if not (folder / "chat_template.json").is_file():
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": rt.QWEN_VL_CHAT_TEMPLATE}) + "\n")
    else:
        if tokenizer:
            raise ValueError(f"--tokenizer is for the real-vocabulary sizes; {spec.name} uses the fixture's")
        source = Path(fixtures) / "tbac-tiny" / TINY_QWEN
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        origin = {"source": str(source)}
    # The mismatch the first real-size run found (fixture ids in a real config) stops here.
    origin["ids"] = rt.check_tokenizer_matches(folder, spec.mllm)
    return origin


def write_components(spec: RandomSpec, root: Path, fixtures: Path = DEFAULT_FIXTURES,
                     tokenizer: Path | None = None) -> dict:
    """The MLLM folder (config, tokenizer, preprocessor) and the SANA folder of ``spec`` under ``root``."""
    qwen = root / spec.qwen_folder
    origin = write_tokenizer_folder(spec, qwen, fixtures, tokenizer)
    (qwen / "config.json").write_text(json.dumps(spec.mllm, indent=2) + "\n")
    sana = root / spec.sana_folder
    for part, file, config in (("transformer", "config.json", spec.transformer), ("vae", "config.json", spec.vae),
                               ("scheduler", "scheduler_config.json", spec.scheduler)):
        (sana / part).mkdir(parents=True)
        (sana / part / file).write_text(json.dumps(config, indent=2) + "\n")
    return origin


# -- a model straight in memory (no file) -------------------------------------------------------
def build_random_model(spec: RandomSpec, device="cpu", dtype: torch.dtype = torch.float32,
                       vae_dtype: torch.dtype | None = None, seed: int = 0, fixtures: Path = DEFAULT_FIXTURES,
                       tokenizer: Path | None = None, quantization: str | None = None):
    """A ``TBACModel`` with random weights drawn directly on ``device`` in ``dtype``.

    ``quantization`` (``"fp8"``, ``"q8_0"``, ``"q5_k"``, ``"q4_k"``): the MLLM's decoder linears and the
    DiT blocks' attention linears are quantised on ``device`` and swapped for the dequantising
    layers, as ``load_model(..., quantization=...)`` does with a checkpoint.

    Assembled as ``tbac_core.load_model`` assembles a checkpoint (same builders, same strict
    assignment), minus the file: for the 3B architecture on a GPU this skips writing and reading
    11.4 GB. The tokenizer and image processor are the ones ``write_checkpoint`` would write
    (the fixture's, or for ``real`` a real-size tokenizer with Qwen's ids), in a temporary folder.
    """
    import tempfile

    from tbac_core.ladder.conditioning import ModelIdentity, fingerprint_tensor
    from tbac_core.loading.build import (
        image_processor_settings,
        load_strict,
        load_tokenizer,
    )
    from tbac_core.loading.components import TBACConfig
    from tbac_core.modeling.dit import LadderDiT
    from tbac_core.modeling.mllm import attach_lm_head, num_rungs
    from tbac_core.modeling.model import TBACModel
    from tbac_core.processing.prompting import PromptBuilder, make_image_processor
    from tbac_core.quantization import quantize_state, swap_linears

    device = torch.device(device)
    if vae_dtype is None:
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # as the loader: DC-AE overflows in fp16
    generator = torch.Generator(device).manual_seed(seed)
    modules = meta_modules(spec)
    for component, module in modules.items():
        target = vae_dtype if component == "vae" else dtype
        state = {key: random_tensor(_plan_component_key(component, key), tuple(value.shape), target, device,
                                    generator)
                 for key, value in module.state_dict().items()}
        if quantization and component in ("mllm", "dit"):
            state = quantize_state(component, state, quantization)
            swap_linears(module, state, f"random {spec.name} weights")
        load_strict(module, state, f"random {spec.name} weights")
        del state
    mllm = modules["mllm"]
    attach_lm_head(mllm, spec.mllm["vocab_size"])
    mllm.to(device)  # non-persistent buffers (rotary frequencies) were built on the CPU
    dit = LadderDiT(modules["dit"], modules["connector"]).to(device).eval().requires_grad_(False)
    vae = modules["vae"].to(device).eval().requires_grad_(False)

    config = TBACConfig.from_dict(spec.tbac_config(), f"random {spec.name} spec")
    with tempfile.TemporaryDirectory(prefix="tbac-tokenizer-") as folder:
        tokenizer_dir = Path(folder)
        write_tokenizer_folder(spec, tokenizer_dir, fixtures, tokenizer)
        settings = image_processor_settings([tokenizer_dir])
        prompts = PromptBuilder(load_tokenizer(tokenizer_dir), make_image_processor(settings),
                                config.max_input_text_tokens, settings)
    embedding = mllm.get_input_embeddings().weight
    base_vocab = spec.mllm["vocab_size"]
    identity = ModelIdentity(
        name=f"random-{spec.name}",
        fingerprint=fingerprint_tensor(embedding[base_vocab: base_vocab + spec.num_metaqueries]),
        hidden_size=embedding.shape[1],
        num_rungs=num_rungs(mllm),
        num_metaqueries=spec.num_metaqueries,
        num_dit_blocks=dit.num_blocks,
    )
    return TBACModel(config, Path(f"random-{spec.name}"), mllm, base_vocab, prompts, dit, vae,
                     dict(spec.scheduler), identity)


def parameter_counts(spec: RandomSpec) -> dict[str, int]:
    return {component: sum(math.prod(shape) for c, _, _, shape in tensor_plan(spec) if c == component)
            for component in ("mllm", "connector", "dit", "vae")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=SPEC_NAMES)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder that receives <size>/ (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES,
                        help="shared/fixtures folder (tokenizer + tiny configs); default $TBAC_FIXTURES or tests/fixtures")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a real Qwen2.5 tokenizer folder for real / tiny-real-vocab (e.g. ComfyUI's "
                             "comfy/text_encoders/qwen25_tokenizer); default: a synthetic one of the real size")
    args = parser.parse_args(argv)
    spec = make_spec(args.size, args.fixtures)
    start = time.perf_counter()
    checkpoint = write_checkpoint(spec, args.out, args.seed, args.fixtures, int(args.max_shard_gb * 1024**3),
                                  tokenizer=args.tokenizer)
    files = sorted(checkpoint.glob("*.safetensors"))
    counts = parameter_counts(spec)
    print(json.dumps({
        "checkpoint": str(checkpoint),
        "image_size": spec.image_size,
        "parameters": counts,
        "total_parameters": sum(counts.values()),
        "file_bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
        "tokenizer": args.tokenizer and str(args.tokenizer) or ("synthetic" if spec.real_tokenizer else "fixture"),
        "seconds": round(time.perf_counter() - start, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
