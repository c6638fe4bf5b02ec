"""Hostile command lines, batch rows, --from-png records and comfy_queue inputs: an exit status and a
one-line message, never a traceback, a raw exception, a hang or unbounded memory."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from hostile import HOSTILE, bounded, hostile_json_value, hostile_text, nested_json
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from comfy_queue.errors import QueueError
from tbac_core.cli import main
from tbac_core.io.pngmeta import encode_png

RAW_MARK = "--debug shows the traceback"  # the CLI's last-resort line for an exception that is not ours
EXIT_CODES = (0, 1, 2, 130)


def run_cli(argv, pipe) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv, pipeline=pipe)
        except SystemExit as exc:  # argparse refusing an option: exit 2 with its usage line
            code = exc.code
    return code, stderr.getvalue()


def assert_clean_exit(argv, pipe) -> None:
    ended = bounded(lambda: run_cli(argv, pipe), ())
    code, stderr = ended.result
    assert code in EXIT_CODES, (code, stderr)
    assert RAW_MARK not in stderr and "Traceback" not in stderr, stderr


JOB_FLAGS = {
    "--prompt": hostile_text, "--seed": st.sampled_from(["True", "1.5", "-1", str(2**70), "nan", "", "0x10"]),
    "--steps": st.sampled_from(["0", "1.0", "1e9", "abc", "-5", "1"]),
    "--width": st.sampled_from(["0", "31", "33", "1e3", "32", "-32"]),
    "--guidance": st.sampled_from(["nan", "inf", "-1", "x", "4.5"]),
    "--layers": hostile_text,
    "--negative-prompt": hostile_text,
    "--image": st.sampled_from(["/dev/zero", "/dev/null", "/nonexistent.png", "", "/tmp", "x" * 300]),
}
UNDERSTAND_FLAGS = {
    "--question": hostile_text, "--system-prompt": hostile_text,
    "--image": JOB_FLAGS["--image"], "--max-new-tokens": st.sampled_from(["0", "-1", "99999", "2", "x"]),
}


@HOSTILE
@given(command=st.sampled_from(["generate", "edit", "understand"]), data=st.data())
@example(command="understand", data=None)
@example(command="generate", data=None)
def test_command_lines(pipe, tmp_path, command, data):
    table = UNDERSTAND_FLAGS if command == "understand" else JOB_FLAGS
    argv = [command, "--max-new-tokens", "2", "--question", "what?"] if command == "understand" else [
        command, "--out", str(tmp_path / "out"), "--steps", "1", "--width", "32", "--height", "32", "--prompt", "x"]
    if data is None:  # the explicit examples: a lone surrogate and a device file
        argv += ["--image", "/dev/zero"] if command == "understand" else ["--prompt", "a\udc00\ud800"]
    else:
        for flag in data.draw(st.lists(st.sampled_from(sorted(table)), max_size=3, unique=True), label="flags"):
            argv += [flag, data.draw(table[flag], label=flag).replace("\x00", "")]
    assert_clean_exit(argv, pipe)


def _png_with_record(path, record_text: str) -> None:
    data = encode_png(Image.new("RGB", (32, 32)), {"prompt": "x"})
    with Image.open(io.BytesIO(data)) as image:
        info = PngImagePlugin.PngInfo()
        for key, value in image.text.items():
            info.add_text(key, record_text if "tbac" in key else value)
        image.save(path, pnginfo=info)


RECORD_VALUES = st.one_of(hostile_json_value(), st.sampled_from([True, 1.5, "3", [1], {"a": 1}, -1, 2**70, None]))


@HOSTILE
@given(field=st.sampled_from(["steps", "seed", "width", "height", "guidance_scale", "prompt", "layers", "sampler",
                              "num_images", "denoise"]), value=RECORD_VALUES)
@example(field="seed", value=True)
@example(field="steps", value="3")
@example(field="prompt", value=["x"])
def test_from_png_with_untyped_values(pipe, tmp_path, field, value):
    path = tmp_path / "in.png"
    _png_with_record(path, json.dumps({"prompt": "x", "steps": 1, "width": 32, "height": 32, field: value}))
    assert_clean_exit(["generate", "--from-png", str(path), "--out", str(tmp_path / "out")], pipe)


@HOSTILE
@given(text=st.sampled_from([nested_json(10000), "{", "[]", "null", "\ud800"]))
def test_from_png_with_broken_records(pipe, tmp_path, text):
    path = tmp_path / "in.png"
    _png_with_record(path, text.encode("utf-8", "replace").decode())
    assert_clean_exit(["generate", "--from-png", str(path), "--out", str(tmp_path / "out")], pipe)


ROW_FIELDS = st.dictionaries(st.sampled_from(["id", "prompt", "seed", "steps", "width", "images", "layers", "x"]),
                             RECORD_VALUES, max_size=4)


@HOSTILE
@given(rows=st.lists(ROW_FIELDS, min_size=1, max_size=3), deep=st.booleans())
@example(rows=[{"id": "x" * 400, "prompt": "a"}, {"prompt": "b"}], deep=False)
@example(rows=[{"id": "a/../../b\x00", "prompt": "a"}], deep=False)
@example(rows=[{"prompt": "\ud800"}], deep=False)
def test_batch_rows(pipe, tmp_path, rows, deep):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"steps": 1, "width": 32, "height": 32, **row}) for row in rows]
    if deep:
        lines.append(nested_json(5000))
    path.write_text("\n".join(lines) + "\n")
    assert_clean_exit(["batch", str(path), "--out", str(tmp_path / "out")], pipe)


# -- comfy_queue -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workflow_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("wf") / "workflow.json"
    workflow = {"1": {"class_type": "TBACLadderEncode", "inputs": {"prompt": "x", "layers": "default"}},
                "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a", "images": ["1", 0]}}}
    path.write_text(json.dumps(workflow))
    return path


@HOSTILE
@given(rows=st.one_of(st.lists(st.dictionaries(hostile_text, RECORD_VALUES, max_size=3), max_size=3).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows)), st.just(nested_json(10000)), hostile_text),
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
@example(rows='{"id": "' + "x" * 400 + '", "1.prompt": "a"}\n{"id": "b", "1.prompt": "b"}', suffix=".jsonl")
def test_queue_rows_and_dry_run(tmp_path, workflow_path, rows, suffix):
    from comfy_queue.cli import main as queue_main
    from comfy_queue.rows import load_rows

    path = tmp_path / f"rows{suffix}"
    path.write_bytes(rows.encode("utf-8", "surrogatepass"))
    bounded(lambda: load_rows(path), (QueueError,))
    stderr = io.StringIO()

    def dry_run():
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                return queue_main([str(workflow_path), str(path), "--dry-run"])
            except SystemExit as exc:
                return exc.code

    code = bounded(dry_run, ()).result
    assert code in (0, 1, 2) and "Traceback" not in stderr.getvalue()


@HOSTILE
@given(document=st.one_of(hostile_json_value(), st.dictionaries(hostile_text, hostile_json_value(), max_size=3)))
def test_queue_workflows(document):
    from comfy_queue.workflow import check_workflow

    bounded(lambda: check_workflow(document), (QueueError,))
