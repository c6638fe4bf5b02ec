"""The demo model's tiny components: a word-level Qwen2 tokenizer, configs, and initial weights.

Everything is written by hand as plain JSON (not through ``save_pretrained``), so the files do not
depend on the installed transformers/diffusers versions and a rebuild gives the same bytes.

* Tokenizer: Qwen2's byte-level BPE layout (pre-tokenizer regex, byte-level decoder, the 22
  Qwen2.5-VL added tokens), with merges built so that every word of the demo captions, edit
  instructions, chat template and TBAC system prompt is ONE token. One token per word keeps the
  caption-to-metaquery distance fixed, which a frozen random MLLM needs to tell "a red circle on a
  blue background" from "a blue circle on a red background".
* MLLM: Qwen2.5-VL with the fixture's tiny sizes. The initial weights are drawn key by key from a
  seeded generator, so they do not depend on how a transformers version initialises modules; the
  build then pretrains them (``demo.pretrain``) and freezes them.
* DiT / VAE / scheduler: diffusers configs (SANA transformer, DC-AE, SANA's flow DPM-Solver++).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.files import atomic_write_json
from ..loading import builtin_configs
from ..modeling.mllm import build_mllm, canonical_key

# Qwen2 pre-tokenisation regex (as in Qwen2/Qwen2.5 tokenizer.json).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5-VL's added tokens in id order (content, special); ids follow the BPE vocabulary.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TBAC_SYSTEM_PROMPT = (
    "You will be given an image or its caption. Please describe the content of the image in detail in "
    "your own words."
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and seeds of the demo model (real TBAC-UniImage-3B in the comments)."""

    seed: int = 0
    image_size: int = 32  # [512]
    # Pixels a 32x32 picture is shown to the vision tower at: 112x112 = 64 patches = 16 visual tokens.
    # At 56x56 (4 tokens) the tiny vision tower could not tell a circle from a square reliably.
    vision_pixels: int = 112 * 112
    num_metaqueries: int = 8  # [64]
    spare_vocab: int = 16  # model vocab_size - len(tokenizer) [271]
    # Qwen2.5-VL text decoder, as the shared tiny fixture [hidden 2048, 36 layers]
    mllm_hidden: int = 64
    mllm_intermediate: int = 128
    mllm_layers: int = 6
    mllm_heads: int = 4
    mllm_kv_heads: int = 2
    mllm_init_std: float = 0.1
    # SANA DiT [20 layers, 70 x 32 heads, caption 2304]
    dit_layers: int = 4
    dit_heads: int = 2
    dit_head_dim: int = 32
    caption_channels: int = 64
    dit_mlp_ratio: float = 2.5
    # DC-AE [f32c32: 6 stages]
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    flow_shift: float = 3.0

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


# -- tokenizer ------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte -> printable unicode mapping, in GPT-2's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _make_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_tokens([AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False)
                    for t, s in QWEN_ADDED_TOKENS])
    return tok


def word_merges(texts: list[str]):
    """A byte-level BPE vocabulary + merges under which every pre-token of ``texts`` is one token.

    Each pre-token gets the chain of merges that builds it left to right; when merges of other
    words make BPE split it differently, the merge of its two first pieces is added until it is
    whole (each round removes one piece, so this ends).
    """
    byte_map = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(byte_map.values())}
    merges: list[tuple[str, str]] = []
    pre = _pre_tokenizer()
    pieces = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})

    def add(left: str, right: str) -> None:
        if (left, right) not in merges:
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))

    for piece in pieces:
        for end in range(2, len(piece) + 1):
            add(piece[: end - 1], piece[end - 1])
    for _ in range(10 * len(pieces)):
        tok = _make_tokenizer(vocab, merges)
        split = [p for p in pieces if len(tok.encode(_unbyte(p, byte_map)).tokens) > 1]
        if not split:
            return vocab, merges, pieces
        for piece in split:
            parts = tok.encode(_unbyte(piece, byte_map)).tokens
            add(parts[0], parts[1])
    raise RuntimeError("Could not build one-token-per-word merges; this is a bug.")


def _unbyte(piece: str, byte_map: dict[int, str]) -> str:
    inverse = {v: k for k, v in byte_map.items()}
    return bytes(inverse[ch] for ch in piece).decode("utf-8")


def tokenizer_texts(words: list[str], sentences: list[str] = ()) -> list[str]:
    """What the tokenizer must keep whole: the chat template's texts, every word, with and
    without a leading space (a caption's first word follows ``user\\n`` with no space), and the
    words of ``sentences`` (the demo's questions)."""
    texts = ["system\n" + TBAC_SYSTEM_PROMPT, "system\nYou are a helpful assistant.", "user\n", "assistant\n", "\n"]
    texts += [w for w in words] + [" " + w for w in words] + list(sentences)
    return texts


def write_tokenizer(folder: Path, words: list[str], spare_vocab: int, sentences: list[str] = (), *,
                    image_pixels: int) -> dict:
    """Write tokenizer.json, vocab.json, merges.txt and the config files; return their ids.

    ``image_pixels``: the preprocessor's ``min_pixels``, i.e. the size every (smaller) demo picture is
    shown to the vision tower at."""
    vocab, merges, _ = word_merges(tokenizer_texts(words, sentences))
    tok = _make_tokenizer(vocab, merges)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    write_json(folder / "vocab.json", vocab, sort_keys=False)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    base = len(vocab)
    ids = {token: base + i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}
    added = {
        str(ids[token]): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": special}
        for token, special in QWEN_ADDED_TOKENS
    }
    special = [t for t, s in QWEN_ADDED_TOKENS if s and t != "<|endoftext|>"]
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        "additional_special_tokens": special,
        "bos_token": None,
        "chat_template": QWEN_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": special, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    })
    write_json(folder / "chat_template.json", {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    write_json(folder / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": 50176, "merge_size": 2, "min_pixels": image_pixels, "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"longest_edge": 50176, "shortest_edge": image_pixels}, "temporal_patch_size": 2,
    })
    return {"len_tokenizer": base + len(QWEN_ADDED_TOKENS), "vocab_size": base + len(QWEN_ADDED_TOKENS) + spare_vocab,
            "ids": ids}


# -- MLLM -----------------------------------------------------------------------------------
def mllm_config(spec: DemoSpec, vocab_size: int, ids: dict[str, int]) -> dict:
    """A Qwen2.5-VL config.json in the released (flat) layout."""
    rotary = spec.mllm_hidden // spec.mllm_heads // 2
    section = [rotary - 2 * (rotary * 3 // 8), rotary * 3 // 8, rotary * 3 // 8]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": spec.mllm_hidden,
        "image_token_id": ids["<|image_pad|>"],
        "initializer_range": spec.mllm_init_std,
        "intermediate_size": spec.mllm_intermediate,
        "max_position_embeddings": 4096,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": spec.mllm_heads,
        "num_hidden_layers": spec.mllm_layers,
        "num_key_value_heads": spec.mllm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": section, "type": "mrope"},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": 2, "fullatt_block_indexes": [1], "hidden_act": "silu", "hidden_size": 32,
            "in_channels": 3, "initializer_range": spec.mllm_init_std, "intermediate_size": 64,
            "model_type": "qwen2_5_vl", "num_heads": 2, "out_hidden_size": spec.mllm_hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
            "window_size": 112,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vocab_size": vocab_size,
    }


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_mllm_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random Qwen2.5-VL weights (canonical key layout) over the config's vocabulary, no LM head.

    Matrices ~ N(0, initializer_range), norms 1, biases 0 (as transformers initialises Qwen), but
    each tensor comes from its own generator seeded by its name: independent of module order and
    of the transformers version. The demo build pretrains these (``demo.pretrain``).
    """
    model, _ = build_mllm(config, config["vocab_size"])
    std = float(config["initializer_range"])
    state = {}
    for key, meta in sorted(model.state_dict().items()):
        key = canonical_key(key)
        generator = _key_generator(seed, key)
        if key.endswith(".bias"):
            tensor = torch.zeros(meta.shape)
        elif meta.ndim == 1:
            if not any(name in key for name in ("norm", "ln_q")):
                raise RuntimeError(f"Unexpected 1-D weight {key}; extend random_mllm_state.")
            tensor = torch.ones(meta.shape)
        else:
            tensor = torch.randn(meta.shape, generator=generator) * std
        state[key] = tensor
    return state


EMBED_KEY = "model.language_model.embed_tokens.weight"


def with_metaquery_rows(state: dict[str, torch.Tensor], num_metaqueries: int, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with ``num_metaqueries + 2`` embedding rows appended, as TBAC's checkpoint has them.

    The new rows are drawn like transformers' mean-resizing: the base rows' mean and per-dimension
    spread. Only the embedding changes; the other tensors are shared with ``state``.
    """
    base = state[EMBED_KEY]  # [base_vocab, hidden]
    extra = torch.randn(num_metaqueries + 2, base.shape[1], generator=_key_generator(seed, "metaqueries"))
    return {**state, EMBED_KEY: torch.cat([base, base.mean(0) + extra * base.std(0)])}


def init_mllm_state(config: dict, num_metaqueries: int, seed: int) -> dict[str, torch.Tensor]:
    """Random Qwen2.5-VL weights with the metaquery rows (a checkpoint for tests of the build)."""
    return with_metaquery_rows(random_mllm_state(config, seed), num_metaqueries, seed)


# -- diffusion parts ------------------------------------------------------------------------
def transformer_config(spec: DemoSpec) -> dict:
    inner = spec.dit_heads * spec.dit_head_dim
    return {
        "_class_name": "SanaTransformer2DModel",
        "attention_bias": False,
        "attention_head_dim": spec.dit_head_dim,
        "caption_channels": spec.caption_channels,
        "cross_attention_dim": inner,
        "cross_attention_head_dim": spec.dit_head_dim,
        "dropout": 0.0,
        "guidance_embeds": False,
        "in_channels": spec.latent_channels,
        "interpolation_scale": None,
        "mlp_ratio": spec.dit_mlp_ratio,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-06,
        "num_attention_heads": spec.dit_heads,
        "num_cross_attention_heads": spec.dit_heads,
        "num_layers": spec.dit_layers,
        "out_channels": spec.latent_channels,
        "patch_size": 1,
        "qk_norm": None,
        "sample_size": spec.latent_size,
    }


def vae_config(spec: DemoSpec, scaling_factor: float = 1.0) -> dict:
    stages = len(spec.vae_channels)
    types = ["ResBlock"] * (stages - 1) + ["EfficientViTBlock"]
    multiscales = [[]] * (stages - 1) + [[5]]
    return {
        "_class_name": "AutoencoderDC",
        "attention_head_dim": 8,
        "decoder_act_fns": "silu",
        "decoder_block_out_channels": list(spec.vae_channels),
        "decoder_block_types": types,
        "decoder_layers_per_block": [1] * stages,
        "decoder_norm_types": "rms_norm",
        "decoder_qkv_multiscales": multiscales,
        "downsample_block_type": "Conv",
        "encoder_block_out_channels": list(spec.vae_channels),
        "encoder_block_types": types,
        "encoder_layers_per_block": [1] * stages,
        "encoder_qkv_multiscales": multiscales,
        "in_channels": 3,
        "latent_channels": spec.latent_channels,
        "scaling_factor": scaling_factor,
        "upsample_block_type": "interpolate",
    }


def scheduler_config(spec: DemoSpec) -> dict:
    """SANA's flow DPM-Solver++ settings (what the official pipeline samples with)."""
    return {**builtin_configs.SANA_FLOW_DPM_SCHEDULER_CONFIG, "flow_shift": spec.flow_shift}


def build_transformer(spec: DemoSpec):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(spec.seed + 1)
    return SanaTransformer2DModel.from_config(transformer_config(spec))


def build_vae(spec: DemoSpec):
    from diffusers import AutoencoderDC

    torch.manual_seed(spec.seed + 2)
    return AutoencoderDC.from_config(vae_config(spec))


def write_json(path: Path, data, sort_keys: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, sort_keys=sort_keys)

