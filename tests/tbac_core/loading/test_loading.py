"""Checkpoint loading: formats, layouts, built-in architecture and every refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tbac_core.errors import CheckpointError, ComponentNotFoundError
from tbac_core.loading import load_model
from tbac_core.loading.checkpoint import INDEX_NAME
from tbac_core.modeling.model import TBACModel

PUBLISHED_PARAMETERS = 5_681_505_091  # TencentBAC/TBAC-UniImage-3B, all tensors


def make_checkpoint(tmp_path: Path, fixture_root: Path, tensors: dict | None = None, config: dict | None = None,
                    with_weights_in_components: bool = False) -> Path:
    """A copy of the tiny checkpoint in ``tmp_path/ckpt`` with its component folders beside it.

    The component folders get configs and tokenizer files only (no weights) unless asked: the
    loader must never need the base models' weights.
    """
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    source = fixture_root / "checkpoint"
    raw_config = json.loads((source / "config.json").read_text())
    raw_config.update(config or {})
    (ckpt / "config.json").write_text(json.dumps(raw_config))
    if tensors is None:
        shutil.copy(source / "model.safetensors", ckpt / "model.safetensors")
    elif tensors:
        save_file(tensors, str(ckpt / "model.safetensors"))
    for folder in ("tiny-Qwen2.5-VL-Instruct", "tiny-Sana_diffusers"):
        for path in (fixture_root / folder).rglob("*"):
            if path.is_file() and (with_weights_in_components or not path.name.endswith(".safetensors")):
                target = tmp_path / folder / path.relative_to(fixture_root / folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    return ckpt


@pytest.fixture(scope="module")
def golden_tensors(fixture_root):
    return load_file(fixture_root / "checkpoint" / "model.safetensors")


def _same_weights(a: TBACModel, b: TBACModel) -> None:
    for module_a, module_b in ((a.mllm, b.mllm), (a.dit, b.dit), (a.vae, b.vae)):
        state_b = dict(module_b.named_parameters())
        for name, param in module_a.named_parameters():
            assert torch.equal(param, state_b[name]), name


def test_loads_without_component_weights(tmp_path, fixture_root, pipe):
    model = load_model(make_checkpoint(tmp_path, fixture_root), device="cpu", dtype="fp32")
    _same_weights(model, pipe.model)
    assert model.identity == pipe.model.identity or model.identity.fingerprint == pipe.model.identity.fingerprint


def test_loads_target_dtype_directly(checkpoint_dir):
    model = load_model(checkpoint_dir, device="cpu", dtype="bf16")
    dtypes = {p.dtype for p in model.mllm.parameters()} | {p.dtype for p in model.dit.parameters()}
    assert dtypes == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in model.mllm.parameters())
    assert not any(b.device.type == "meta" for b in model.mllm.buffers())


def test_sharded_checkpoint(tmp_path, fixture_root, golden_tensors, pipe):
    ckpt = make_checkpoint(tmp_path, fixture_root, tensors={})
    keys = sorted(golden_tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: golden_tensors[k] for k in part}, str(ckpt / name))
        weight_map.update({k: name for k in part})
    (ckpt / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_model(ckpt, device="cpu", dtype="fp32")
    _same_weights(model, pipe.model)

    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="Missing shard.*model-00002-of-00002"):
        load_model(ckpt, device="cpu")

    save_file({k: golden_tensors[k] for k in keys[1::2][:-3]}, str(ckpt / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 3 tensor"):
        load_model(ckpt, device="cpu")


def test_new_transformers_key_layout(tmp_path, fixture_root, golden_tensors, pipe):
    """transformers >= 4.52 saves model.language_model.X / model.visual.X; both layouts load."""
    renamed = {}
    for key, value in golden_tensors.items():
        if key.startswith("model.mllm_backbone.visual."):
            key = key.replace("model.mllm_backbone.visual.", "model.mllm_backbone.model.visual.")
        elif key.startswith("model.mllm_backbone.model."):
            key = key.replace("model.mllm_backbone.model.", "model.mllm_backbone.model.language_model.")
        renamed[key] = value
    model = load_model(make_checkpoint(tmp_path, fixture_root, tensors=renamed), device="cpu",
                                      dtype="fp32")
    _same_weights(model, pipe.model)


def test_wrong_model_type(tmp_path, fixture_root):
    ckpt = make_checkpoint(tmp_path, fixture_root, config={"model_type": "qwen2_5_vl"})
    with pytest.raises(CheckpointError, match="model_type 'qwen2_5_vl'.*tbacuniimage"):
        load_model(ckpt, device="cpu")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="Checkpoint folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="No config.json"):
        load_model(tmp_path)


def test_pickle_weights_refused(tmp_path, fixture_root):
    ckpt = make_checkpoint(tmp_path, fixture_root, tensors={})
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle-based.*pytorch_model.bin.*refused"):
        load_model(ckpt, device="cpu")


def test_corrupt_safetensors(tmp_path, fixture_root):
    ckpt = make_checkpoint(tmp_path, fixture_root)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(ckpt, device="cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        ("drop", "1 missing: model.language_model.layers.0.mlp.up_proj.weight"),
        ("extra", "1 unexpected: model.language_model.extra.weight"),
        ("reshape", "mis-shaped: proj_out.weight"),
        ("foreign", "Unexpected tensor.*lm_head.weight"),
    ],
)
def test_strict_keys(tmp_path, fixture_root, golden_tensors, edit, message):
    tensors = dict(golden_tensors)
    if edit == "drop":
        del tensors["model.mllm_backbone.model.layers.0.mlp.up_proj.weight"]
    elif edit == "extra":
        tensors["model.mllm_backbone.model.extra.weight"] = torch.zeros(2)
    elif edit == "reshape":
        tensors["model.transformer.proj_out.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    elif edit == "foreign":
        tensors["lm_head.weight"] = torch.zeros(2)
    ckpt = make_checkpoint(tmp_path, fixture_root, tensors=tensors)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(ckpt, device="cpu")
    assert str(ckpt) in str(info.value)


def test_missing_component_folder_says_where_it_looked(tmp_path, fixture_root):
    ckpt = tmp_path / "lonely"
    ckpt.mkdir()
    shutil.copy(fixture_root / "checkpoint" / "config.json", ckpt)
    shutil.copy(fixture_root / "checkpoint" / "model.safetensors", ckpt)
    with pytest.raises(ComponentNotFoundError, match="'tiny-Qwen2.5-VL-Instruct' \\(looked in .*lonely"):
        load_model(ckpt, device="cpu")


def test_missing_tokenizer_says_where_it_looked(tmp_path, fixture_root):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((fixture_root / "checkpoint" / "config.json").read_text())
    config["mllm_id"] = "Qwen/Qwen2.5-VL-3B-Instruct"  # not present locally: built-in config, no tokenizer
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.copy(fixture_root / "checkpoint" / "model.safetensors", ckpt)
    with pytest.raises(ComponentNotFoundError, match="No Qwen2.5 tokenizer found. Looked in: .*ckpt"):
        load_model(ckpt, device="cpu", models_dirs=[fixture_root])


def test_builtin_architecture_is_the_published_one(tmp_path, fixture_root):
    """Without component folders the published TBAC-UniImage-3B architecture is used.

    The tiny weights then do not fit it, and the error says so; the architecture itself is
    checked on the meta device against the published sizes and parameter count.
    """
    from tbac_core.modeling.meta_init import empty_weights
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from tbac_core.loading import builtin_configs as b
    from tbac_core.modeling.dit import Connector
    from tbac_core.modeling.mllm import build_mllm, num_rungs, text_model

    num_metaqueries = 64
    mllm, vocab = build_mllm(b.QWEN25_VL_3B_CONFIG, 151936 + num_metaqueries + 2)
    with empty_weights():
        dit = SanaTransformer2DModel.from_config(b.SANA_1600M_512_TRANSFORMER_CONFIG)
        vae = AutoencoderDC.from_config(b.DCAE_F32C32_CONFIG)
        connector = Connector(2048, dit.config.caption_channels)
    assert vocab == 151936
    assert text_model(mllm).norm.weight.shape == (2048,)
    assert num_rungs(mllm) == 37  # 36 decoder layers
    assert len(dit.transformer_blocks) == 20
    assert dit.config.in_channels == vae.config.latent_channels == 32
    assert 16 * 2 ** (len(vae.config.encoder_block_out_channels) - 1) == 512
    count = sum(sum(p.numel() for p in m.parameters()) for m in (mllm, dit, vae, connector))
    # The published total counts every tensor of the checkpoint once: Qwen2.5-VL-3B with its
    # embedding grown by 64 + 2 rows (tied LM head, not stored), the connector, SANA-1600M and
    # the DC-AE encoder + decoder. Our modules hold exactly these tensors.
    assert count == PUBLISHED_PARAMETERS

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((fixture_root / "checkpoint" / "config.json").read_text())
    config.update(mllm_id="Qwen/Qwen2.5-VL-3B-Instruct",
                  diffusion_model_id="Efficient-Large-Model/Sana_1600M_512px_diffusers",
                  vae_id="Efficient-Large-Model/Sana_1600M_512px_diffusers",
                  scheduler_id="Efficient-Large-Model/Sana_1600M_512px_diffusers")
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.copy(fixture_root / "checkpoint" / "model.safetensors", ckpt)
    with pytest.raises(CheckpointError, match="embedding .* has 382 rows, but vocab_size 151936"):
        load_model(ckpt, device="cpu", tokenizer_dir=fixture_root / "tiny-Qwen2.5-VL-Instruct")


def test_plain_tokenizer_folder_and_builtin_image_processor(tmp_path, fixture_root, pipe):
    """vocab.json + merges.txt + tokenizer_config.json alone (as ComfyUI bundles), no preprocessor config."""
    ckpt = make_checkpoint(tmp_path, fixture_root)
    qwen = tmp_path / "tiny-Qwen2.5-VL-Instruct"
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.json", "special_tokens_map.json",
                 "added_tokens.json"):
        (qwen / name).unlink()
    model = load_model(ckpt, device="cpu", dtype="fp32")
    image = Image.open(fixture_root / "goldens" / "edit_input_0.png").convert("RGB")
    ours = model.encode("Replace the red square with a blue circle", images=[[image]])
    reference = pipe.model.encode("Replace the red square with a blue circle", images=[[image]])
    for branch in ("positive", "negative", "image_negative"):
        assert torch.equal(getattr(ours.sources[0], branch), getattr(reference.sources[0], branch))


# -- tokenizer / MLLM config agreement, image-processor precedence ----------------------------
@pytest.mark.parametrize("key, field_name", [("image_token_id", "image_pad"),
                                             ("vision_start_token_id", "vision_start"),
                                             ("vision_end_token_id", "vision_end")])
def test_tokenizer_ids_must_match_the_mllm_config(tmp_path, fixture_root, key, field_name):
    ckpt = make_checkpoint(tmp_path, fixture_root)
    mllm_config = tmp_path / "tiny-Qwen2.5-VL-Instruct" / "config.json"
    raw = json.loads(mllm_config.read_text())
    tokenizer_id = raw[key]
    raw[key] = 151655  # the real Qwen2.5-VL id in front of the tiny tokenizer: the bench's mistake
    mllm_config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as caught:
        load_model(ckpt, device="cpu")
    message = str(caught.value)
    for part in (field_name, key, str(tokenizer_id), "151655", str(mllm_config),
                 str(tmp_path / "tiny-Qwen2.5-VL-Instruct")):
        assert part in message


def _preprocessor(folder: Path, max_pixels: int, fixture_root: Path) -> None:
    settings = json.loads((fixture_root / "tiny-Qwen2.5-VL-Instruct" / "preprocessor_config.json").read_text())
    settings.update(max_pixels=max_pixels, size={"shortest_edge": 3136, "longest_edge": max_pixels})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))


def test_preprocessor_precedence_user_then_component_then_checkpoint(tmp_path, fixture_root):
    ckpt = make_checkpoint(tmp_path, fixture_root)
    component = tmp_path / "tiny-Qwen2.5-VL-Instruct"
    user = tmp_path / "user-tokenizer"
    shutil.copytree(component, user)
    _preprocessor(user, 200704, fixture_root)
    _preprocessor(ckpt, 100352, fixture_root)
    max_pixels = lambda model: model.prompts.processor_settings["max_pixels"]  # noqa: E731

    assert max_pixels(load_model(ckpt, device="cpu", tokenizer_dir=user)) == 200704  # the user's folder wins
    assert max_pixels(load_model(ckpt, device="cpu")) == 50176  # then the MLLM component folder
    (component / "preprocessor_config.json").unlink()
    assert max_pixels(load_model(ckpt, device="cpu")) == 100352  # then the checkpoint folder
    (user / "preprocessor_config.json").unlink()
    # A user's tokenizer folder without settings does not hide the checkpoint's.
    assert max_pixels(load_model(ckpt, device="cpu", tokenizer_dir=user)) == 100352
    (ckpt / "preprocessor_config.json").unlink()
    from tbac_core.loading.builtin_configs import QWEN25_VL_IMAGE_PROCESSOR
    assert load_model(ckpt, device="cpu").prompts.processor_settings == QWEN25_VL_IMAGE_PROCESSOR


@pytest.mark.parametrize("change", [
    {"min_pixels": "3136"}, {"max_pixels": 0}, {"patch_size": True}, {"merge_size": 2.5},
    {"size": {"shortest_edge": "x"}}, {"size": [3136]}, {"temporal_patch_size": 10**9},
])
def test_a_preprocessor_config_with_bad_numbers_is_refused_at_load(tmp_path, fixture_root, change):
    ckpt = make_checkpoint(tmp_path, fixture_root)
    path = tmp_path / "tiny-Qwen2.5-VL-Instruct" / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    settings.update(change)
    path.write_text(json.dumps(settings))
    key = next(iter(change))
    with pytest.raises(CheckpointError, match=key) as caught:
        load_model(ckpt, device="cpu")
    assert str(path) in str(caught.value)


def test_out_of_memory_is_not_reported_as_a_corrupt_file(checkpoint_dir, monkeypatch):
    """Only read/format errors become "file corrupt"; a failing move to the device raises as itself."""
    from tbac_core.loading.checkpoint import CheckpointFiles

    files = CheckpointFiles.open(checkpoint_dir)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        files.load_component("vae", torch.float32, "cpu")


def test_listing_skips_folders_with_hostile_configs(tmp_path, checkpoint_dir):
    """One malformed config.json under the model root (deeply nested, not an object, not UTF-8) must not
    hide the others: listing reports what it can read and skips the rest."""
    from tbac_core.loading import list_checkpoints
    from tbac_core.loading.adapters import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        list_adapters,
    )

    root = tmp_path / "tbac"
    root.mkdir()
    (root / "good").symlink_to(checkpoint_dir, target_is_directory=True)
    for name, text in (("deep", "[" * 100_000 + "]" * 100_000), ("list", "[1, 2]"), ("bytes", None)):
        folder = root / name
        folder.mkdir(parents=True)
        if text is None:
            (folder / "config.json").write_bytes(b"\xff\xfe\x00garbage")
        else:
            (folder / "config.json").write_text(text)
        (folder / ADAPTER_CONFIG).write_text(text or "{")
        (folder / ADAPTER_WEIGHTS).write_bytes(b"")
    assert list(list_checkpoints([root])) == ["good"]
    assert list_adapters(root) == []


def test_index_with_a_malformed_weight_map_is_a_checkpoint_error(tmp_path, checkpoint_dir):
    import shutil

    from tbac_core.loading import load_model

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, folder)
    (folder / "model.safetensors").unlink()
    for text in ('{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}', "[" * 5000 + "]" * 5000, '{"metadata": {}}'):
        (folder / INDEX_NAME).write_text(text)
        with pytest.raises(CheckpointError, match="index"):
            load_model(folder, device="cpu", dtype="fp32")


def test_demo_by_name_loads_the_built_in_model(tmp_path, monkeypatch):
    """``load_model("demo")`` / ``TBACPipeline.from_pretrained("demo")`` mean the built-in model, as in the
    CLI and the loader node; a real folder named demo still wins."""
    from tbac_core import TBACPipeline
    from tbac_core.demo import DEMO_CHECKPOINT
    from tbac_core.loading import load_model

    monkeypatch.chdir(tmp_path)
    pipe = TBACPipeline.from_pretrained("demo", device="cpu", dtype="fp32")
    assert pipe.model.checkpoint_dir == DEMO_CHECKPOINT
    (tmp_path / "demo").mkdir()
    with pytest.raises(CheckpointError, match="No config.json"):
        load_model("demo", device="cpu", dtype="fp32")
