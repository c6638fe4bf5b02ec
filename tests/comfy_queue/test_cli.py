"""The command line: dry run, argument checks, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_comfy import write_jsonl, write_workflow

import comfy_queue as q
from comfy_queue.cli import parse_size

ROOT = Path(__file__).resolve().parents[2]


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


def test_help_names_the_finite_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        q.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 3600)" in text and "--http-timeout" in text and "total time one HTTP request" in text
    assert "--max-download" in text and "(default 2 GiB)" in text


@pytest.mark.parametrize("flag, value", [
    ("--job-timeout", "0"), ("--job-timeout", "inf"), ("--http-timeout", "-1"), ("--poll-interval", "nan"),
    ("--max-download", "0"), ("--max-download", "lots"), ("--dead-after", "0"),
])
def test_unbounded_or_nonsense_flags_are_refused(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        q.main(["w.json", "r.jsonl", "--dry-run", flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("size, expected", [("1048576", 2**20), ("500M", 500 * 2**20), ("2G", 2 * 2**30),
                                            ("1.5kib", 1536)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_unusable_files_exit_2_with_a_message(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 10000 + "]" * 10000)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"3.seed": 1}])
    assert q.main([str(deep), rows, "--dry-run"]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    assert q.main([str(tmp_path / "missing.json"), rows, "--dry-run"]) == 2
    assert "cannot read workflow file" in capsys.readouterr().err
    assert q.main([write_workflow(tmp_path), str(tmp_path), "--dry-run"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert q.main([write_workflow(tmp_path), rows, "--out", str(tmp_path / "o"), "--server", "ftp://x"]) == 2
    assert "not an address" in capsys.readouterr().err


def test_never_finishing_prompt_fails_at_the_job_timeout_from_the_command_line(tmp_path, fake, capsys):
    a = fake("a", pending_polls=10**6)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "stuck"}])
    rc = q.main([write_workflow(tmp_path), rows, "--out", str(tmp_path / "o"), "--server", a.url,
                 "--job-timeout", "0.3", "--poll-interval", "0.01", "--no-progress"])
    assert rc == 1 and "no result" in capsys.readouterr().out


def test_module_help_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "comfy_queue", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "--job-timeout" in result.stdout
