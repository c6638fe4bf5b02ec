"""run_queue against fake ComfyUI servers on 127.0.0.1: spreading, failures, resume, deadlines."""
from __future__ import annotations

import os
import socket

import comfy_queue as q
from fake_comfy import FAST, WORKFLOW, content, read_manifest, write_jsonl, write_workflow


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
