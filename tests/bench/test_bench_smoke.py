"""The benchmark scripts work before a GPU is lent: gpu_bench --smoke end to end, random checkpoints load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import make_random_checkpoint as mrc  # noqa: E402

PUBLISHED_PARAMETERS = 5_681_505_091  # TencentBAC/TBAC-UniImage-3B, all tensors


def test_gpu_bench_smoke_runs_and_reports(tmp_path, fixture_root):
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_bench.py"), "--smoke", "--threads", "1", "--out", str(out),
         "--fixtures", str(fixture_root.parent)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "| memory mode | batch | s/image |" in done.stdout
    assert "bf16 on cpu" in done.stdout
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["model"]["architecture"] == "tiny"
    assert set(result["speed"]) == {"full", "offload-mllm"}
    for mode in result["speed"].values():
        assert set(mode["batches"]) == {"1", "2"}
        for stats in mode["batches"].values():
            for key in ("seconds_per_image", "encode_seconds", "step_seconds", "decode_seconds"):
                assert stats[key]["median"] > 0, key
            assert stats["step_seconds"]["runs"] == 1  # 2 steps -> one interval between step callbacks
            assert stats["peak_memory"]["bytes"] > 0
    parity = result["parity"]
    assert parity["golden_ok"] and parity["reference_vs_golden_latents_max_abs"] <= 1e-4
    bf16 = parity["compared"]["bf16 on cpu"]
    # bf16 really ran (a difference exists) and stays within the stated tolerance.
    assert 0 < bf16["latents_max_abs"] <= bf16["tolerance"]["latents"]
    assert bf16["within_tolerance"]


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory, fixture_root):
    spec = mrc.make_spec("tiny", fixture_root.parent)
    checkpoint = mrc.write_checkpoint(spec, tmp_path_factory.mktemp("models"), seed=3, fixtures=fixture_root.parent)
    return spec, checkpoint


def test_random_tiny_checkpoint_has_the_official_format(tiny_random, fixture_root):
    spec, checkpoint = tiny_random
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "tbacuniimage" and config["num_metaqueries"] == 8
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as mine, \
            safe_open(str(fixture_root / "checkpoint" / "model.safetensors"), "pt") as official:
        assert set(mine.keys()) == set(official.keys())  # <=4.51 Qwen layout, no lm_head
        for key in official.keys():
            assert mine.get_slice(key).get_shape() == official.get_slice(key).get_shape(), key
            assert mine.get_slice(key).get_dtype() == official.get_slice(key).get_dtype(), key
        rows = mine.get_slice("model.mllm_backbone.model.embed_tokens.weight").get_shape()[0]
    assert rows == spec.mllm["vocab_size"] + 8 + 2


def test_random_tiny_checkpoint_loads_and_generates(tiny_random, fixture_root):
    from tbac_core import TBACPipeline, load_model

    spec, checkpoint = tiny_random
    model = load_model(checkpoint, device="cpu", dtype="fp32")
    output = TBACPipeline(model, cache_size=0).generate("a red cat", steps=2, seed=1)
    assert output.tensors.shape == (1, 64, 64, 3)
    assert torch.isfinite(output.latents).all() and output.tensors.std() > 0.01  # not a flat image

    # gpu_bench builds the same model straight in memory: same draws in the same order, so the
    # weights equal the loaded ones (the DiT up to its bfloat16 storage).
    direct = mrc.build_random_model(spec, device="cpu", dtype=torch.float32, seed=3, fixtures=fixture_root.parent)
    assert direct.identity.fingerprint == model.identity.fingerprint
    loaded = dict(model.mllm.named_parameters())
    for name, param in direct.mllm.named_parameters():
        assert torch.equal(param, loaded[name]), name
    loaded = dict(model.dit.named_parameters())
    for name, param in direct.dit.named_parameters():
        expected = param.bfloat16().float() if name.startswith("transformer.") else param
        assert torch.equal(expected, loaded[name]), name


def test_real_spec_is_the_published_architecture(fixture_root):
    spec = mrc.make_spec("real", fixture_root.parent)
    assert sum(mrc.parameter_counts(spec).values()) == PUBLISHED_PARAMETERS
    assert spec.image_size == 512 and spec.embedding_rows == 151936 + 64 + 2
