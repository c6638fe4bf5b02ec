"""The command line: dry run, argument checks, exit codes."""
from __future__ import annotations

import json

import comfy_queue as q
from fake_comfy import write_jsonl, write_workflow


def test_dry_run_prints_prompts_without_network(tmp_path, capsys):
    rows = [{"id": "a", "3.seed": "9"}, {"id": "b", "3.seed": 2}]
    argv = [write_workflow(tmp_path), write_jsonl(tmp_path / "rows.jsonl", rows), "--dry-run",
            "--server", "http://127.0.0.1:9"]
    assert q.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    assert lines[0]["overrides"] == {"3.seed": 9} and lines[0]["prompt"]["3"]["inputs"]["seed"] == 9
    rows.append({"id": "c", "3.nope": 1})
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert q.main(argv) == 1
    assert "c: INVALID: 3.nope" in capsys.readouterr().err
