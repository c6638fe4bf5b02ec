"""The opt-in accelerations on the command line: flags, PNG records, --from-png, batch throughput mode."""
from __future__ import annotations

import numpy as np
import pytest
from cli_support import manifest, pixels, write_jsonl

from tbac_core.cli import main
from tbac_core.cli.batch import MANIFEST_NAME
from tbac_core.io.pngmeta import read_parameters
from tbac_core.params import MAX_BATCH, SamplingParams

STEPS = 4


class DiTCalls:
    """Counts the DiT's forward calls (one per denoising step of a batch) and their batch rows."""

    def __init__(self, dit):
        self.rows: list[int] = []
        self.handle = dit.register_forward_pre_hook(lambda _m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_acceleration_flags_reach_the_pipeline_and_the_record(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "a red cat", "--steps", str(STEPS), "--seed", "3", "--out", str(tmp_path),
            "--cache-threshold", "0.5", "--guidance-cutoff", "0.5", "--cache-max-skips", "3"]
    assert main(argv, pipeline=pipe) == 0
    expected = pipe.generate("a red cat", steps=STEPS, seed=3, cache_threshold=0.5, guidance_cutoff=0.5,
                             cache_max_skips=3).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "tbac_3_0.png"), np.asarray(expected))
    record = read_parameters(tmp_path / "tbac_3_0.png")
    assert (record["cache_threshold"], record["guidance_cutoff"], record["cache_max_skips"]) == (0.5, 0.5, 3)

    # --from-png renders it again with the same accelerations: same pixels, same record.
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(tmp_path / "tbac_3_0.png"), "--out", str(again)], pipeline=pipe) == 0
    np.testing.assert_array_equal(pixels(again / "tbac_3_0.png"), np.asarray(expected))
    assert read_parameters(again / "tbac_3_0.png") == record


def test_exact_render_records_no_acceleration(pipe, tmp_path, capsys):
    argv = ["generate", "-p", "a red cat", "--steps", "2", "--out", str(tmp_path), "--guidance-cutoff", "1",
            "--cache-threshold", "0", "--cache-max-skips", "4"]
    assert main(argv, pipeline=pipe) == 0
    record = read_parameters(tmp_path / "tbac_0_0.png")
    # The off values = exact; the skip limit means nothing without the cache.
    assert not {"cache_threshold", "guidance_cutoff", "cache_max_skips"} & set(record)


def test_cached_render_records_its_skip_limit_even_at_the_default():
    from tbac_core.cli.jobs import Job

    assert Job(prompt="x", cache_threshold=0.1).accelerations == {
        "cache_threshold": 0.1, "cache_max_skips": SamplingParams.cache_max_skips}


@pytest.mark.parametrize("flag,value,message", [("--cache-threshold", "2", "cache_threshold must be in 0..1.0"),
                                                ("--guidance-cutoff", "-0.1", "guidance_cutoff must be a fraction"),
                                                ("--cache-max-skips", "0", "cache_max_skips must be an integer in 1..")])
def test_acceleration_flags_are_checked_before_the_model(flag, value, message, tmp_path, capsys):
    assert main(["generate", "-p", "x", flag, value, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_batch_rows_take_the_accelerations(pipe, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "fast", "prompt": "a cat", "seed": 2, "guidance_cutoff": 0.5}])
    out = tmp_path / "out"
    assert main(["batch", str(rows), "--out", str(out), "--steps", str(STEPS)], pipeline=pipe) == 0
    expected = pipe.generate("a cat", seed=2, steps=STEPS, guidance_cutoff=0.5).images[0]
    np.testing.assert_array_equal(pixels(out / "fast_0.png"), np.asarray(expected))
    assert read_parameters(out / "fast_0.png")["guidance_cutoff"] == 0.5
    # A rerun with the same values skips the row; another cutoff renders it again.
    assert main(["batch", str(rows), "--out", str(out), "--steps", str(STEPS)], pipeline=pipe) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().err
    assert main(["batch", str(rows), "--out", str(out), "--steps", str(STEPS), "--guidance-cutoff", "0.7"],
                pipeline=pipe) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().err  # the row's own value wins over the flag default


THROUGHPUT_ROWS = [
    {"id": "a", "prompt": "a red cat", "seed": 1, "num_images": 2},
    {"id": "b", "prompt": "a blue house by the river", "seed": 7, "num_images": 2},
    {"id": "c", "prompt": "green", "seed": 3, "num_images": 2},
    {"id": "other", "prompt": "a red cat", "seed": 1, "num_images": 2, "guidance": 2.0},  # another batch key
    {"id": "cached", "prompt": "a tree", "seed": 5, "num_images": 2, "cache_threshold": 0.1},  # renders alone
]


def test_throughput_mode_gives_the_one_by_one_images_with_fewer_dit_calls(pipe, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", THROUGHPUT_ROWS)
    alone, together = tmp_path / "alone", tmp_path / "together"
    with DiTCalls(pipe.model.dit) as calls_alone:
        assert main(["batch", str(rows), "--out", str(alone), "--steps", str(STEPS)], pipeline=pipe) == 0
    with DiTCalls(pipe.model.dit) as calls_together:
        assert main(["batch", str(rows), "--out", str(together), "--steps", str(STEPS), "--throughput", "8"],
                    pipeline=pipe) == 0
    assert calls_alone.rows == [4] * (5 * STEPS)  # 2 images x 2 guidance rows, every row alone
    # a, b, c as one batch of 12 rows; 'other' and 'cached' alone.
    assert calls_together.rows == [12] * STEPS + [4] * STEPS + [4] * STEPS
    for row in THROUGHPUT_ROWS:
        for k in range(2):
            name = f"{row['id']}_{k}.png"
            difference = np.abs(pixels(alone / name).astype(int) - pixels(together / name).astype(int))
            assert difference.max() <= 1, name  # float rounding of the batched products, at most one level
            assert read_parameters(alone / name) == read_parameters(together / name)
    assert {r["status"] for r in manifest(together)} == {"done"} and len(manifest(together)) == 5


def test_throughput_group_too_large_for_memory_falls_back_to_one_by_one(pipe, tmp_path, monkeypatch, capsys):
    from tbac_core.pipeline import batch_memory

    per_row = batch_memory.denoise_bytes_per_row(pipe.model.dit, 8, 8)
    monkeypatch.setattr(batch_memory, "available_bytes", lambda device: 4 * per_row)  # one row of 2 images
    rows = write_jsonl(tmp_path / "rows.jsonl", THROUGHPUT_ROWS[:3])
    with DiTCalls(pipe.model.dit) as calls:
        assert main(["batch", str(rows), "--out", str(tmp_path / "out"), "--steps", "2", "--throughput", "3"],
                    pipeline=pipe) == 0
    err = capsys.readouterr().err
    assert "could not be denoised together" in err and "at most 4 rows fit" in err
    assert calls.rows == [4] * (3 * 2)  # refused before its first step, then each row alone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([
        MANIFEST_NAME, "a_0.png", "a_1.png", "b_0.png", "b_1.png", "c_0.png", "c_1.png"])


@pytest.mark.parametrize("value", ["0", str(MAX_BATCH + 1)])
def test_throughput_value_is_checked_before_anything_renders(pipe, tmp_path, value, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", THROUGHPUT_ROWS[:1])
    assert main(["batch", str(rows), "--out", str(tmp_path / "out"), "--throughput", value], pipeline=pipe) == 2
    assert f"throughput must be a whole number of rows in 1..{MAX_BATCH}" in capsys.readouterr().err


def test_job_defaults_of_the_accelerations_are_the_library_off_values():
    from tbac_core.cli.jobs import Job

    job = Job(prompt="x")
    assert (job.cache_threshold, job.guidance_cutoff) == (SamplingParams.cache_threshold, SamplingParams.guidance_cutoff)
    assert job.accelerations == {}
