"""Reading rows from JSONL and CSV; bad rows are reported and skipped, the others go on."""
from __future__ import annotations

import os

import comfy_queue as q
from fake_comfy import FAST, WORKFLOW


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
