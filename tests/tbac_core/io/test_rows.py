"""The rows reader and bounded JSON: hostile files give the project's errors, never raw exceptions."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbac_core.errors import PNGMetadataError, UsageError
from tbac_core.io import jsonfile, parse_json, read_json, read_records


def test_jsonl_csv_tsv_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('# comment\n\n{"prompt": "x"}\n// also\nnot json\n[1]\n')
    records, text = read_records(tmp_path / "a.jsonl")
    assert not text and [r.where for r in records] == ["a.jsonl line 3", "a.jsonl line 5", "a.jsonl line 6"]
    assert records[0].data == {"prompt": "x"} and "not valid JSON" in records[1].problems[0][1]
    (tmp_path / "b.csv").write_bytes("\ufeffprompt,seed\nx,1,extra\ny,2\n".encode())
    records, text = read_records(tmp_path / "b.csv")
    assert text and [r.data for r in records] == [{"prompt": "x", "seed": "1"}, {"prompt": "y", "seed": "2"}]
    assert "more cell(s)" in records[0].problems[0][1] and not records[1].problems
    (tmp_path / "c.tsv").write_text("prompt\tseed\nx\t1\n")
    assert read_records(tmp_path / "c.tsv")[0][0].data == {"prompt": "x", "seed": "1"}
    (tmp_path / "d.json").write_text('[{"prompt": "x"}, 3]')
    assert [r.data for r in read_records(tmp_path / "d.json")[0]] == [{"prompt": "x"}, 3]
    (tmp_path / "e.json").write_text('{"prompt": "x"}')
    with pytest.raises(UsageError, match="must hold a list"):
        read_records(tmp_path / "e.json")


def test_unreadable_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="Cannot read the rows file"):
        read_records(tmp_path / "missing.csv")
    with pytest.raises(UsageError, match="not a regular file"):
        read_records(tmp_path)
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):  # would hang if opened
        read_records(fifo)
    (tmp_path / "latin.csv").write_bytes(b"prompt\n\xe9\n")
    with pytest.raises(UsageError, match="not utf-8-sig text"):
        read_records(tmp_path / "latin.csv")


def test_deep_and_huge_json_are_refused(tmp_path, monkeypatch):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(UsageError, match="nested 100000 levels deep; at most 64"):
        parse_json(deep, "x")
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(UsageError, match="nested"):
        read_records(tmp_path / "deep.json")
    (tmp_path / "deep.jsonl").write_text('{"prompt": "ok"}\n' + '{"a":' * 1000 + "1" + "}" * 1000 + "\n")
    records, _ = read_records(tmp_path / "deep.jsonl")
    assert records[0].data == {"prompt": "ok"} and "nested 1000 levels" in records[1].problems[0][1]
    inside = '{"a": "' + "[" * 70 + '"}'
    assert parse_json(inside, "x") == {"a": "[" * 70}  # brackets inside strings do not count
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 10)
    (tmp_path / "big.json").write_text("[" + "1," * 100 + "1]")
    with pytest.raises(PNGMetadataError, match="larger than"):
        read_json(tmp_path / "big.json", error=PNGMetadataError, max_bytes=10)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="[]{}\",:\\ a1\n", max_size=300))
def test_parse_json_gives_a_value_or_a_usage_error(text):
    try:
        parse_json(text, "x")
    except UsageError:
        pass
