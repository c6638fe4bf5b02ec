"""A Qwen2.5 tokenizer folder of the real size for the ``real`` random checkpoint.

Two sources, same ids (the ones Qwen2.5-VL-3B's config.json names):

* ``copy_tokenizer(src, folder)``: a real Qwen2.5 tokenizer folder, e.g. the one ComfyUI ships in
  ``comfy/text_encoders/qwen25_tokenizer`` (vocab.json + merges.txt + tokenizer_config.json).
  Prompts then have their real token counts.
* ``write_synthetic_tokenizer(folder)``: no download, no ComfyUI: a byte-level BPE with Qwen2.5's
  151,643 regular tokens (256 bytes, every 2-byte pair, then 3-byte tokens) and its 22 added
  tokens at 151,643..151,664. Text splits into 2-3 byte pieces, so prompts come out ~1.5x longer
  than with Qwen's merges; the ids of every structure token are Qwen's.

``check_tokenizer_matches(folder, mllm_config)`` loads the folder with the library's loader and
compares each structure token's id with the MLLM config (the mismatch the first real-size run hit:
the tiny fixture's ids 329/332 in a 151,936-row config).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tbac_core.demo.components import QWEN_ADDED_TOKENS, QWEN_VL_CHAT_TEMPLATE

QWEN25_REGULAR_TOKENS = 151_643  # ids 0..151642 are BPE tokens; <|endoftext|> is 151643
# Qwen2.5-VL-3B-Instruct's preprocessor_config.json (the image-size limits the fixture's copy lacks).
QWEN25_VL_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 3136, "longest_edge": 12845056},
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "resample": 3, "rescale_factor": 1 / 255,
}
# The files a Qwen2.5 tokenizer folder may hold (ComfyUI's has the first three).
TOKENIZER_FILE_NAMES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json",
                        "special_tokens_map.json", "added_tokens.json")
# SpecialIds field -> Qwen2.5-VL config key, for every id the prompt builder places.
CONFIG_KEYS = {"im_start": None, "im_end": "eos_token_id", "vision_start": "vision_start_token_id",
               "vision_end": "vision_end_token_id", "image_pad": "image_token_id", "pad": "bos_token_id"}


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / Qwen's printable stand-in for each byte, printable ASCII first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    # Space (Ġ) and lowercase letters first, so the lowest-ranked merges are the common pairs.
    order = [ord(" "), *range(ord("a"), ord("z") + 1)]
    return [chars[b] for b in order] + [chars[b] for b in range(256) if b not in order]


def synthetic_vocab_and_merges(size: int = QWEN25_REGULAR_TOKENS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``size`` BPE tokens: 256 bytes, all 65,536 byte pairs, then (pair, byte) triples in order."""
    alphabet = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    pairs = [(a, b) for a in alphabet for b in alphabet]
    for left, right in pairs:
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    for left, right in ((a + b, c) for a, b in pairs for c in alphabet):
        if len(vocab) >= size:
            break
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    if len(vocab) != size:
        raise ValueError(f"cannot build {size} tokens from byte pairs and triples (got {len(vocab)})")
    return vocab, merges


def _tokenizer_config(base: int) -> dict:
    added = {str(base + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special}
             for i, (token, special) in enumerate(QWEN_ADDED_TOKENS)}
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, s in QWEN_ADDED_TOKENS if s and t != "<|endoftext|>"],
        "bos_token": None, "chat_template": QWEN_VL_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_synthetic_tokenizer(folder: Path) -> dict:
    """Write vocab.json + merges.txt + tokenizer_config.json (ComfyUI's shape) of the real size."""
    vocab, merges = synthetic_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(len(vocab)), indent=2),
                                                  encoding="utf-8")
    return {"source": "synthetic byte-level BPE", "regular_tokens": len(vocab),
            "added_tokens": len(QWEN_ADDED_TOKENS)}


def copy_tokenizer(source: Path, folder: Path) -> dict:
    """Copy a Qwen2.5 tokenizer folder's tokenizer files (not its preprocessor settings)."""
    names = [name for name in TOKENIZER_FILE_NAMES if (Path(source) / name).is_file()]
    if "vocab.json" not in names and "tokenizer.json" not in names:
        raise FileNotFoundError(f"{source} holds neither vocab.json nor tokenizer.json: not a tokenizer folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(source) / name, folder / name)
    return {"source": str(source), "files": names}


def check_tokenizer_matches(folder: Path, mllm_config: dict) -> dict:
    """Load ``folder`` as the library does; raise ValueError if a structure id differs from the config.

    Returns ``{field: id}``. Stricter than the loader's own check (which covers the image-placement
    ids): the chat ids and the vocabulary bound are compared too.
    """
    from tbac_core.loading.build import load_tokenizer
    from tbac_core.processing.prompting import SpecialIds

    tokenizer = load_tokenizer(Path(folder))
    ids = SpecialIds.from_tokenizer(tokenizer)
    wrong = []
    for field_name, key in CONFIG_KEYS.items():
        token_id = getattr(ids, field_name)
        if key is not None and mllm_config.get(key) != token_id:
            wrong.append(f"{field_name}: tokenizer {token_id}, config {key} = {mllm_config.get(key)}")
        if not 0 <= token_id < mllm_config["vocab_size"]:
            wrong.append(f"{field_name}: id {token_id} outside the config's vocab_size {mllm_config['vocab_size']}")
    if len(tokenizer) > mllm_config["vocab_size"]:
        wrong.append(f"the tokenizer has {len(tokenizer)} tokens, the config's vocab_size is {mllm_config['vocab_size']}")
    if wrong:
        raise ValueError(f"tokenizer {folder} and the MLLM config disagree: " + "; ".join(wrong))
    return {field_name: getattr(ids, field_name) for field_name in CONFIG_KEYS}
