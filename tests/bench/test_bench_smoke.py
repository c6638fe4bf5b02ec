"""The benchmark scripts work before a GPU is lent: gpu_bench --smoke end to end, random checkpoints load."""
from __future__ import annotations

import dataclasses
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

import make_random_checkpoint as mrc
import real_tokenizer as rt

PUBLISHED_PARAMETERS = 5_681_505_091  # TencentBAC/TBAC-UniImage-3B, all tensors


def test_gpu_bench_smoke_runs_and_reports(tmp_path, fixture_root):
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_bench.py"), "--smoke", "--threads", "1", "--out", str(out),
         "--fixtures", str(fixture_root.parent), "--accelerated", "cache_threshold=1,cache_max_skips=1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "| memory mode | batch | s/image |" in done.stdout and "RSS kept after the runs |" in done.stdout
    assert "bf16 on cpu" in done.stdout
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["model"]["architecture"] == "tiny"
    assert set(result["speed"]) == {"full", "offload-mllm"}
    for mode in result["speed"].values():
        assert set(mode["batches"]) == {"1", "2"}
        assert isinstance(mode["memory_kept_after_runs_bytes"], int)  # RSS growth on the CPU: only its presence
        for stats in mode["batches"].values():
            for key in ("seconds_per_image", "encode_seconds", "step_seconds", "decode_seconds"):
                assert stats[key]["median"] > 0, key
            assert stats["step_seconds"]["runs"] == 1  # 2 steps -> one interval between step callbacks
            assert stats["peak_memory"]["bytes"] > 0
    # fp8 and GGUF Q8_0 ran through the dequantising layers (item 6: full mode, same batches).
    assert set(result["quantized"]) == {"fp8", "q8_0"}
    for fmt, stats in result["quantized"].items():
        assert stats["quantized_layers"] > 0, fmt
        assert stats["weights_bytes"] < result["model"]["weights_bytes"], fmt
        for batch_stats in stats["batches"].values():
            assert batch_stats["seconds_per_image"]["median"] > 0
    assert "| full, q8_0 weights | 1 |" in done.stdout
    # The acceleration set ran at batch 1 against the exact path, on the same seeds: its second step was
    # estimated, so every image differs from the exact one (a finite PSNR).
    accelerated = result["accelerated"]
    assert set(accelerated) == {"exact", "cache_threshold 1 + cache_max_skips 1"}
    row = accelerated["cache_threshold 1 + cache_max_skips 1"]
    assert row["settings"] == {"cache_threshold": 1.0, "cache_max_skips": 1} and row["seconds_per_image"] > 0
    assert row["psnr_db_vs_exact"] and all(0 < p < float("inf") for p in row["psnr_db_vs_exact"])
    assert "| cache_threshold 1 + cache_max_skips 1 |" in done.stdout
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
        for key in official.keys():  # noqa: SIM118 (safe_open is not iterable)
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


# Qwen2.5-VL's ids, as ComfyUI's qwen25_tokenizer and Qwen2.5-VL-3B's config.json give them.
QWEN_IDS = {"pad": 151643, "im_start": 151644, "im_end": 151645, "vision_start": 151652, "vision_end": 151653,
            "image_pad": 151655}


def test_real_size_components_have_qwen_ids_tokenizer_and_preprocessor(tmp_path, fixture_root):
    spec = mrc.make_spec("real", fixture_root.parent)
    origin = mrc.write_components(spec, tmp_path, fixture_root.parent)
    qwen = tmp_path / spec.qwen_folder
    config = json.loads((qwen / "config.json").read_text())
    assert origin["ids"] == QWEN_IDS
    assert (config["image_token_id"], config["vision_start_token_id"], config["video_token_id"]) == (151655, 151652,
                                                                                                   151656)
    assert origin["regular_tokens"] == 151_643 and config["vocab_size"] == 151_936
    preprocessor = json.loads((qwen / "preprocessor_config.json").read_text())
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (3136, 12845056)
    assert (preprocessor["patch_size"], preprocessor["merge_size"], preprocessor["temporal_patch_size"]) == (14, 2, 2)
    # the official code's processor (transformers 4.5x) reads the chat template from this file only
    assert "<|im_start|>" in json.loads((qwen / "chat_template.json").read_text())["chat_template"]


def test_fixture_ids_in_a_real_vocabulary_config_are_refused(tmp_path, fixture_root):
    """The first real-size run's bug: the fixture's tokenizer (image token 332) with a 151,936-row config."""
    real = mrc.make_spec("real", fixture_root.parent)
    with pytest.raises(ValueError, match="image_pad: tokenizer 151655, config image_token_id = 332"):
        fixture_ids = json.loads((fixture_root / mrc.TINY_QWEN / "config.json").read_text())
        wrong = dict(real.mllm, **{k: fixture_ids[k] for k in mrc.TOKEN_ID_FIELDS})
        mrc.write_components(dataclasses.replace(real, mllm=wrong), tmp_path / "a", fixture_root.parent)
    with pytest.raises(ValueError, match="image_pad: tokenizer 332, config image_token_id = 151655"):
        mrc.write_components(dataclasses.replace(real, real_tokenizer=False), tmp_path / "b", fixture_root.parent)


def test_synthetic_tokenizer_is_a_valid_bpe_of_the_real_size():
    vocab, merges = rt.synthetic_vocab_and_merges()
    assert len(vocab) == 151_643 and sorted(vocab.values()) == list(range(151_643))
    assert all(a + b in vocab for a, b in merges[:1000] + merges[-1000:])


def test_cpu_real_bench_phases_edit_and_understand_with_the_real_vocabulary(tmp_path, fixture_root):
    """cpu_real_bench's worker code on tiny-real-vocab (real vocabulary, ids, tokenizer, preprocessor), bf16
    and GGUF Q8_0, in this process (``--smoke`` runs the same functions, one process each)."""
    import cpu_real_bench as crb

    spec = mrc.make_spec("tiny-real-vocab", fixture_root.parent)
    checkpoint = mrc.write_checkpoint(spec, tmp_path / "models", fixtures=fixture_root.parent)
    check = crb.load_checks(checkpoint, fixture_root / mrc.TINY_QWEN)
    assert check["refused"] and "332" in check["message"] and "151655" in check["message"]
    quantized = crb.quantize(checkpoint, crb.format_dir(checkpoint, "q8_0"), "q8_0")
    assert quantized["file_bytes"] > 0 and (crb.format_dir(checkpoint, "q8_0") / "model.gguf").is_file()
    runs = [crb.worker(crb.format_dir(checkpoint, fmt), fmt, spec.image_size, steps=2, tokens=8, threads=2,
                       headroom=crb.SMOKE_HEADROOM_BYTES) for fmt in ("bf16", "q8_0")]
    for run in runs:
        assert run["finite"] == {"t2i": True, "edit": True}
        # 64x64 under Qwen's min_pixels 3136: resized to 56x56 -> 2x2 merged patches (the fixture's
        # settings would give the same here; the real-size run checks 324 for 512x512).
        assert run["counts"]["understand_vision_tokens"] == 4
        assert 1 <= run["counts"]["answer_tokens"] <= 8
        assert run["image_processor"] == {"min_pixels": 3136, "max_pixels": 12845056}
        assert set(run["phases"]) == {"load", "t2i_encode", "t2i_sample", "t2i_decode", "edit_encode",
                                      "edit_sample", "edit_decode", "understand"}
        assert all(phase["seconds"] > 0 and phase["peak_rss"] > 0 for phase in run["phases"].values())
    assert runs[1]["weights_bytes"] < runs[0]["weights_bytes"]
    table = crb.tables({"architecture": spec.name, "runs": runs, "quantize": [quantized], "load_check": check})
    assert "| understand 8 tokens |" in table and "| q8_0 |" in table


def test_speed_bench_reports_each_acceleration_against_the_exact_run(tmp_path, fixture_root):
    import speed_bench

    out = tmp_path / "speed.json"
    result = speed_bench.main(["--model", str(fixture_root / "checkpoint"), "--steps", "4", "--repeats", "1",
                               "--thresholds", "1", "--max-skips", "1,3", "--cutoffs", "0.5", "--out", str(out)])
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == {"exact", "cache 1, max skips 1", "cache 1, max skips 3", "cutoff 0.5",
                         "cache 1, max skips 1 + cutoff 0.5"}
    assert rows["exact"]["blocks_run_fraction"] == 1.0 and rows["exact"]["psnr_db"] == float("inf")
    # Threshold 1 skips whatever the limit allows: 4 steps run blocks 1.. at steps 0 and 2 (1 skip in a
    # row) or at step 0 alone (3 skips); block 0, the probe, runs at every step.
    blocks = json.loads((fixture_root / "tiny-Sana_diffusers" / "transformer" / "config.json").read_text())["num_layers"]
    for name, full_steps in (("cache 1, max skips 1", 2), ("cache 1, max skips 3", 1)):
        expected = (4 + full_steps * (blocks - 1)) / (4 * blocks)
        assert rows[name]["blocks_run_fraction"] == pytest.approx(expected, abs=1e-3), name
        assert rows[name]["psnr_db"] < float("inf"), name
    assert rows["cutoff 0.5"]["blocks_run_fraction"] == 1.0 and rows["cutoff 0.5"]["psnr_db"] < float("inf")
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_cpu_bench_times_every_phase_and_both_encodes(tmp_path, fixture_root):
    import cpu_bench

    out = tmp_path / "cpu.json"
    result = cpu_bench.main(["--size", "tiny", "--models", str(tmp_path / "models"), "--repeats", "1",
                             "--load-repeats", "1", "--steps", "2", "--threads", "1", "--out", str(out)])
    run = result["run"]
    for key in ("first_encode_seconds", "encode_seconds", "step_seconds", "generation_seconds", "decode_seconds"):
        assert run[key]["median"] > 0, key
    assert run["encode_seconds"]["runs"] == run["first_encode_seconds"]["runs"] == 3  # repeats + 2
    assert "MLLM conditioning, first (negative + prompt rows" in result["table"]
    assert "MLLM conditioning, a new prompt (the negative row cached)" in result["table"]
    assert json.loads(out.read_text())["run"] == run


def test_encode_bench_times_new_prompts_against_the_first(tmp_path, fixture_root):
    import encode_bench

    out = tmp_path / "encode.json"
    result = encode_bench.main(["--model", str(fixture_root / "checkpoint"), "--repeats", "2", "--image-size", "64",
                                "--out", str(out)])
    for key in ("first_prompt_s", "new_prompt_s", "first_edit_s", "new_instruction_same_image_s"):
        assert result[key] > 0, key
    assert json.loads(out.read_text())["new_prompt_s"] == result["new_prompt_s"]


def test_native_step_bench_times_raw_conditions_against_cached_keys_values(tmp_path, fixture_root):
    import native_step_bench

    out = tmp_path / "native.json"
    result = native_step_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "2",
                                     "--out", str(out)])
    assert result["raw_s"] > 0 and result["cached_s"] > 0 and result["raw_cpu_s"] > 0
    assert result["strided_s"] > 0
    assert len(result["raw_all_s"]) == len(result["cached_all_s"]) == len(result["strided_all_s"]) == 2
    assert json.loads(out.read_text())["cached_over_raw"] == result["cached_over_raw"]
    assert result["offloadable_layers"] == 0


def test_native_step_bench_runs_with_the_layers_as_comfyui_has_them(fixture_root):
    import native_step_bench

    result = native_step_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "1",
                                     "--offloadable-layers"])
    assert result["offloadable_layers"] > 10 and result["cached_s"] > 0


def test_decode_bench_times_both_norms_and_finds_the_same_bits(tmp_path, fixture_root):
    import decode_bench

    out = tmp_path / "decode.json"
    result = decode_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "2",
                                "--out", str(out)])
    assert result["same_bits"] is True
    assert result["lean_s"] > 0 and result["diffusers_s"] > 0 and len(result["lean_all_s"]) == 2
    assert json.loads(out.read_text())["lean_over_diffusers"] == result["lean_over_diffusers"]


def test_decode_bench_compares_the_up_blocks(fixture_root):
    import decode_bench

    result = decode_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "2",
                                "--compare", "up-blocks"])
    assert result["same_bits"] is True and result["compare"] == "up-blocks"
    assert result["view_s"] > 0 and result["diffusers_s"] > 0 and result["view_over_diffusers"] > 0


def test_decode_bench_compares_the_folded_upsampling_and_leaves_the_library_state(fixture_root, monkeypatch):
    import decode_bench

    from tbac_core.modeling.dc_up_block import ViewShortcutDCUpBlock

    pipes = []
    load = decode_bench.bu.cpu_pipeline
    monkeypatch.setattr(decode_bench.bu, "cpu_pipeline", lambda *a: pipes.append(load(*a)) or pipes[-1])
    result = decode_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "2",
                                "--compare", "upsampling"])
    assert result["compare"] == "upsampling" and result["folded_s"] > 0 and result["interpolate_s"] > 0
    assert 0 < result["max_abs_difference"] < 1e-4  # within rounding, not the same bits
    decode_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "1",
                       "--compare", "up-blocks"])
    for _, pipe in pipes:
        blocks = [m for m in pipe.model.vae.modules() if isinstance(m, ViewShortcutDCUpBlock)]
        assert blocks and all(block.fold_upsampling for block in blocks)  # the library's own decoder afterwards


def test_attention_bench_times_both_processors(tmp_path, fixture_root):
    import attention_bench

    out = tmp_path / "attention.json"
    result = attention_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--repeats", "2",
                                   "--out", str(out)])
    assert result["max_abs_difference"] < 1e-4
    assert result["token_major_s"] > 0 and result["diffusers_s"] > 0 and len(result["token_major_all_s"]) == 2
    assert json.loads(out.read_text())["token_major_over_diffusers"] == result["token_major_over_diffusers"]


def test_linear_bench_times_both_paths(tmp_path, fixture_root):
    import linear_bench

    out = tmp_path / "linear.json"
    result = linear_bench.main(["--model", str(fixture_root / "checkpoint"), "--size", "64", "--steps", "2",
                                "--repeats", "2", "--products", "2", "--out", str(out)])
    assert len(result["products"]) == 2 and all(p["mkl_gflops"] > 0 and p["onednn_gflops"] > 0
                                                for p in result["products"])
    assert result["latents_max_abs_difference"] < 1e-4
    assert result["mkl_s"] > 0 and result["onednn_s"] > 0 and len(result["onednn_all_s"]) == 2
    assert json.loads(out.read_text())["onednn_over_mkl"] == result["onednn_over_mkl"]
