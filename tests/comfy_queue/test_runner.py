"""run_queue against fake ComfyUI servers on 127.0.0.1: spreading, failures, resume, deadlines."""
from __future__ import annotations

import inspect
import json
import os
import socket
import time

import pytest
from fake_comfy import (
    FAST,
    PNG,
    WORKFLOW,
    content,
    read_manifest,
    write_jsonl,
    write_workflow,
)

import comfy_queue as q


def test_batch_over_two_servers_downloads_files(tmp_path, fake, capsys):
    a, b = fake("a"), fake("b")
    rows = [{"id": f"cat{i}", "3.seed": i, "6.text": f"cat {i}"} for i in range(1, 7)]
    rows[1]["5.batch_size"] = 2
    out = tmp_path / "out"
    rc = q.main([write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--out", str(out),
                 "--server", a.url, "--server", b.url + "/api/", "--poll-interval", "0.01", "--no-progress"])
    assert rc == 0
    assert a.prompts and b.prompts, "work should be spread over both servers"
    assert sorted(a.seeds() + b.seeds()) == [1, 2, 3, 4, 5, 6]
    manifest = read_manifest(out)
    for i in range(1, 7):
        record = manifest[f"cat{i}"]
        assert record["status"] == "done"
        server = a if i in a.seeds() else b
        assert record["server"] == server.url + ("" if server is a else "/api")
        expected = [f"cat{i}_9_0.png"] + ([f"cat{i}_9_1.png"] if i == 2 else [])
        assert record["files"] == expected
        for n, name in enumerate(expected):
            assert content(out / name) == {"server": server.name, "seed": i, "text": f"cat {i}", "i": n}
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    summary = capsys.readouterr().out
    assert "6 done, 0 skipped, 0 failed" in summary
    assert a.url in summary and b.url in summary


def test_rejected_and_failing_rows_are_reported_and_others_finish(tmp_path, fake, capsys):
    a = fake("a")
    rows = [
        {"id": "ok1", "3.seed": 1},
        {"id": "bad", "3.seed": 2, "6.text": "a BAD cat"},
        {"id": "boom", "3.seed": 666},
        {"id": "typo", "99.seed": 3},
        {"id": "ok2", "3.seed": 4},
    ]
    out = tmp_path / "out"
    rc = q.main([write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--out", str(out),
                 "--server", a.url, "--poll-interval", "0.01", "--no-progress"])
    assert rc == 1
    assert (out / "ok1_9_0.png").exists() and (out / "ok2_9_0.png").exists()
    assert sorted(a.seeds()) == [1, 4, 666], "the row with an unknown node must never be submitted"
    captured = capsys.readouterr()
    assert "2 done, 0 skipped, 3 failed" in captured.out
    assert "node 6 (CLIPTextEncode): Value not allowed" in captured.out and "forbidden word" in captured.out
    assert "node 3 (KSampler)" in captured.out and "CUDA out of memory" in captured.out
    assert "unknown node id '99'" in captured.out
    manifest = read_manifest(out)
    assert manifest["bad"]["status"] == "failed" and manifest["boom"]["prompt_id"]
    assert manifest["typo"]["status"] == "invalid"
    assert manifest["ok2"]["status"] == "done"


def test_dead_server_jobs_are_retried_on_the_other(tmp_path, fake):
    a = fake("a", die_after=2)  # finishes one job, accepts a second one and dies while it runs
    b = fake("b")
    rows = [{"id": f"r{i}", "3.seed": i} for i in range(1, 7)]
    logs = []
    summary = q.run_queue(WORKFLOW, rows, [a.url, b.url], tmp_path, dead_after=2, log=logs.append, **FAST)
    assert summary.ok and sorted(summary.done) == [f"r{i}" for i in range(1, 7)]
    assert len(a.prompts) == 2
    lost_seed = a.seeds()[1]
    assert lost_seed in b.seeds(), "the job in flight on the dead server must be rendered by the other"
    stats_a, stats_b = summary.per_server[a.url], summary.per_server[b.url]
    assert stats_a["done"] == 1 and stats_a["handed_off"] == 1 and stats_a["dead"]
    assert stats_b["done"] == 5
    manifest = read_manifest(tmp_path)
    assert manifest[f"r{lost_seed}"]["server"] == b.url
    assert all((tmp_path / f"r{i}_9_0.png").exists() for i in range(1, 7))
    assert any("is dead" in line for line in logs)


def test_all_servers_dead_fails_remaining_rows_clearly(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [{"3.seed": i} for i in range(3)]
    summary = q.run_queue(WORKFLOW, rows, [f"127.0.0.1:{port}"], tmp_path, dead_after=2, log=lambda m: None, **FAST)
    assert not summary.ok and len(summary.failed) == 3
    assert all("all servers are dead" in e for e in summary.failed.values())
    assert "all servers are dead" in summary.format()


def test_resume_skips_done_rows_and_force_reruns(tmp_path, fake, capsys):
    a = fake("a")
    rows = [{"id": f"r{i}", "3.seed": i} for i in range(1, 5)]
    wf, rows_path, out = write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out"
    argv = [wf, rows_path, "--out", str(out), "--server", a.url, "--poll-interval", "0.01", "--no-progress"]
    assert q.main(argv) == 0 and len(a.prompts) == 4

    # a crash while appending left half a line: it is ignored and does not corrupt later records
    with open(out / q.MANIFEST_NAME, "a") as f:
        f.write('{"id": "r1", "status": "fai')
    assert q.main(argv) == 0
    assert len(a.prompts) == 4, "done rows must not be submitted again"
    assert "0 done, 4 skipped, 0 failed" in capsys.readouterr().out

    os.remove(out / "r2_9_0.png")  # a missing output makes its row run again
    rows[2]["6.text"] = "a changed prompt"  # so does an edited row
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert q.main(argv) == 0
    assert a.seeds()[4:] in ([2, 3], [3, 2])
    assert "2 done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "r2_9_0.png").exists()
    read_manifest(out, truncated_lines=1)  # every line except the truncated one still parses
    assert q.main(argv + ["--force"]) == 0
    assert len(a.prompts) == 10


def test_job_timeout_fails_row_and_cancels_it(tmp_path, fake):
    a = fake("a", pending_polls=10**6)
    summary = q.run_queue(WORKFLOW, [{"id": "slow"}], [a.url], tmp_path, job_timeout=0.2,
                          log=lambda m: None, **FAST)
    assert "no result" in summary.failed["slow"] and "--job-timeout" in summary.failed["slow"]
    assert a.interrupted == [a.prompts[0][0]]


def test_prompt_lost_by_a_restarted_server_is_submitted_again(tmp_path, fake):
    a = fake("a", forget={1})
    summary = q.run_queue(WORKFLOW, [{"id": "x", "3.seed": 5}], [a.url], tmp_path, log=lambda m: None, **FAST)
    assert summary.ok and a.seeds() == [5, 5]
    assert (tmp_path / "x_9_0.png").exists()


# -- reliability: deadlines, limits, one bad row never stops the rest ------------------------------


def test_a_trickling_download_fails_its_row_in_bounded_time_and_leaves_no_file(tmp_path, fake):
    a = fake("a", trickle={"/view": "body"}, trickle_delay=0.01)
    started = time.monotonic()
    summary = q.run_queue(WORKFLOW, [{"id": "slow"}], [a.url], tmp_path, http_timeout=0.3, dead_after=2,
                          log=lambda m: None, **FAST)
    assert time.monotonic() - started < 10
    assert "slow" in summary.failed and "--http-timeout" in summary.failed["slow"]
    assert sorted(os.listdir(tmp_path)) == [q.MANIFEST_NAME], "no output and no .part file is left behind"


def test_a_download_over_the_limit_fails_its_row_and_the_others_go_on(tmp_path, fake):
    big = fake("big", view_bytes=3 * 2**20)
    summary = q.run_queue(WORKFLOW, [{"id": "huge", "3.seed": 1}], [big.url], tmp_path / "a",
                          max_download=2**20, log=lambda m: None, **FAST)
    assert "--max-download" in summary.failed["huge"] and "limit of 1 MiB" in summary.failed["huge"]
    assert sorted(os.listdir(tmp_path / "a")) == [q.MANIFEST_NAME]
    small = fake("small")
    summary = q.run_queue(WORKFLOW, [{"id": "ok", "3.seed": 2}], [small.url], tmp_path / "b",
                          max_download=2**20, log=lambda m: None, **FAST)
    assert summary.ok


def deep_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def test_rows_with_unusable_ids_are_skipped_and_the_others_render(tmp_path, fake):
    a = fake("a")
    rows = [{"id": "x" * 300, "3.seed": 1}, {"id": "nul\0byte", "3.seed": 2}, {"id": ["a"], "3.seed": 3},
            {"id": "fine", "3.seed": 4}, "not a row", {"id": "deep", "3.seed": 5, "6.text": "ok"},
            {"id": "nested", "3.seed": 6, "10.tiled_vae": deep_list(5000)}]
    summary = q.run_queue(WORKFLOW, rows, [a.url], tmp_path, log=lambda m: None, **FAST)
    assert sorted(summary.done) == ["deep", "fine"]
    errors = " | ".join(summary.failed.values())
    assert "at most 100 are allowed" in errors and "control characters" in errors
    assert "must be text or a number" in errors and "a row must be an object" in errors
    assert "nested deeper than 64 levels" in errors
    assert sorted(a.seeds()) == [4, 5]


def test_outputs_that_would_share_a_file_name_never_overwrite_each_other(tmp_path, fake):
    # row "x" node "1_2" and row "x_1" node "2" both map to x_1_2_0.png; nodes "a b" and "a_b" of one
    # row both map to <row>_a_b_0.png; "Cat" and "cat" are one file on case-insensitive disks.
    def outputs(pid, prompt):
        seed = prompt["3"]["inputs"]["seed"]
        nodes = {1: ["1_2"], 2: ["2"], 3: ["a b", "a_b"], 4: ["9"], 5: ["9"]}[seed]
        return {node: {"images": [{"filename": f"f{seed}_{i}.png", "subfolder": "", "type": "output"}]}
                for i, node in enumerate(nodes)}

    a = fake("a", outputs=outputs)
    rows = [{"id": "x", "3.seed": 1}, {"id": "x_1", "3.seed": 2}, {"id": "y", "3.seed": 3},
            {"id": "Cat", "3.seed": 4}, {"id": "cat", "3.seed": 5}]
    summary = q.run_queue(WORKFLOW, rows, [a.url], tmp_path, log=lambda m: None, **FAST)
    assert summary.ok
    manifest = read_manifest(tmp_path)
    names = [name for record in manifest.values() for name in record["files"]]
    assert len(names) == 6 and len({n.casefold() for n in names}) == 6, names
    for record in manifest.values():
        for name in record["files"]:
            assert json.loads((tmp_path / name).read_bytes()[len(PNG):])["file"][0].startswith("f")
    served = {json.loads((tmp_path / n).read_bytes()[len(PNG):])["file"][0] for n in names}
    assert len(served) == 6, "every served file landed in its own local file"
    # a rerun keeps every row's names (the manifest holds them) and skips them all
    again = q.run_queue(WORKFLOW, rows, [a.url], tmp_path, log=lambda m: None, **FAST)
    assert sorted(again.skipped) == sorted(r["id"] for r in rows)


def test_the_default_job_timeout_is_finite_and_documented():
    default = inspect.signature(q.run_queue).parameters["job_timeout"].default
    assert default == q.DEFAULT_JOB_TIMEOUT and 0 < default < float("inf")


@pytest.mark.parametrize("option, value", [
    ("job_timeout", None), ("job_timeout", 0), ("http_timeout", -1), ("poll_interval", float("nan")),
    ("max_download", 0), ("job_timeout", True),
])
def test_unbounded_or_nonsense_limits_are_refused(tmp_path, option, value):
    with pytest.raises(q.QueueError, match=option):
        q.run_queue(WORKFLOW, [], ["127.0.0.1:9"], tmp_path, **{**FAST, option: value})
