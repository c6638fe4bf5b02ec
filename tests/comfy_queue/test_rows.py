"""Reading rows from JSONL and CSV; bad rows are reported and skipped, the others go on."""
from __future__ import annotations

import json
import os

import pytest
from fake_comfy import FAST, WORKFLOW
from hypothesis import given, settings
from hypothesis import strategies as st

import comfy_queue as q


def test_csv_rows_with_type_coercion(tmp_path, fake):
    a = fake("a")
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text(
        "\ufeffid,3.seed,3.cfg,3.denoise,10.tiled_vae,6.text,5.batch_size,_note\n"
        "dog,42,6.5,1,true,\"a dog, running\",,first\n"
        ",7,3,0.5,no,a bird,2,\n"
    )
    rows = q.load_rows(csv_path)
    assert [r.id for r in rows] == ["dog", "row0002"]
    prompt = q.apply_overrides(WORKFLOW, rows[0])
    inputs = prompt["3"]["inputs"]
    assert (inputs["seed"], inputs["cfg"], inputs["denoise"]) == (42, 6.5, 1.0)
    assert type(inputs["seed"]) is int and type(inputs["cfg"]) is float and type(inputs["denoise"]) is float
    assert prompt["10"]["inputs"]["tiled_vae"] is True and prompt["6"]["inputs"]["text"] == "a dog, running"
    assert prompt["5"]["inputs"]["batch_size"] == 1, "an empty cell keeps the workflow's value"
    assert WORKFLOW["3"]["inputs"]["seed"] == 1, "the workflow itself is not modified"

    summary = q.run_queue(WORKFLOW, rows, [a.url], tmp_path / "out", log=lambda m: None, **FAST)
    assert summary.ok
    sent = dict((p["3"]["inputs"]["seed"], p) for _, p in a.prompts)
    assert sent[7]["3"]["inputs"]["cfg"] == 3.0 and isinstance(sent[7]["3"]["inputs"]["cfg"], float)
    assert sent[7]["10"]["inputs"]["tiled_vae"] is False and sent[7]["5"]["inputs"]["batch_size"] == 2
    assert sorted(os.listdir(tmp_path / "out")) == sorted([q.MANIFEST_NAME, "dog_9_0.png", "row0002_9_0.png",
                                                           "row0002_9_1.png"])


def test_jsonl_rows_parsing(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '# comment\n'
        '{"name": "first one", "3.seed": "12", "3.cfg": 5}\n'
        '\n'
        '{"3.seed": 3, "seed": 4}\n'
        'not json\n'
        '{"id": "first_one", "3.seed": 1}\n'
    )
    rows = q.load_rows(path)
    assert [r.id for r in rows] == ["first_one", "row0002", "row0003", "first_one"]
    assert rows[0].overrides == {"3.seed": "12", "3.cfg": 5}
    prompt = q.apply_overrides(WORKFLOW, rows[0])
    assert prompt["3"]["inputs"]["seed"] == 12 and prompt["3"]["inputs"]["cfg"] == 5.0
    assert "'seed' is not of the form node_id.input" in rows[1].error
    assert "invalid JSON" in rows[2].error
    jobs, invalid = q.prepare_jobs(WORKFLOW, rows)
    assert [j.row.id for j in jobs] == ["first_one"]
    assert any("duplicate row id 'first_one'" in error for _, error in invalid.values())


# -- bad rows are reported and skipped; an unreadable file is a RowsError --------------------------


def test_bad_rows_carry_an_error_and_the_others_are_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a" * 101, "3.seed": 1}),
        json.dumps({"id": "tab\there", "3.seed": 2}),
        json.dumps({"id": "\ud800", "3.seed": 3}),
        json.dumps({"id": True, "3.seed": 4}),
        "[" * 3000 + "]" * 3000,
        json.dumps({"id": "deep", "3.seed": nested(70)}),
        json.dumps({"id": "nan", "3.cfg": float("nan")}),
        '{"id": "\\ud800x"}',
        json.dumps({"id": "good", "3.seed": 5}),
        json.dumps({"id": "a" * 100, "3.seed": 6}),
    ]) + "\n")
    rows = q.load_rows(path)
    assert [r.error is None for r in rows] == [False] * 8 + [True, True]
    messages = [r.error for r in rows[:8]]
    assert "at most 100 are allowed" in messages[0] and "control characters" in messages[1]
    assert "lone surrogate" in messages[2] and "must be text or a number" in messages[3]
    assert "nested too deeply" in messages[4] and "nested deeper than 64" in messages[5]
    assert "only finite numbers" in messages[6] and "lone surrogate" in messages[7]
    assert rows[8].id == "good" and rows[9].id == "a" * 100
    jobs, invalid = q.prepare_jobs(WORKFLOW, rows)
    assert [j.row.id for j in jobs] == ["good", "a" * 100] and len(invalid) == 8


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("name, data, message", [
    ("rows.json", b"{}", "must hold a list"),
    ("rows.json", b"[" * 5000, "nested too deeply|invalid JSON"),
    ("rows.jsonl", b"\xff\xfe{}", "not utf-8 text"),
    ("rows.csv", b'id,3.seed\n"a,' + b"x" * 200_000 + b"\n", "not readable as CSV"),
    ("missing.jsonl", None, "cannot read"),
])
def test_unreadable_rows_files_are_rows_errors(tmp_path, name, data, message):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(q.RowsError, match=message):
        q.load_rows(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
       ext=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_any_rows_file_gives_rows_or_a_queue_error(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("rows") / f"rows{ext}"
    path.write_bytes(data)
    try:
        rows = q.load_rows(path)
    except q.QueueError as e:
        assert str(path) in str(e)
        return
    jobs, invalid = q.prepare_jobs(WORKFLOW, rows)
    assert len(jobs) + len(invalid) == len(rows)
