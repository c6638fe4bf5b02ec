"""The one atomic / no-overwrite writer family, file-name cleaning and counters."""
from __future__ import annotations

import os

import pytest

from tbac_core.errors import UsageError
from tbac_core.io import (
    MAX_NAME_BYTES,
    atomic_path,
    atomic_write,
    atomic_write_json,
    check_name_length,
    next_counter,
    safe_name,
    write_new_file,
)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # fails mid-write
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        atomic_write(target, b"other", overwrite=False)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.bin"]


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    target = tmp_path / "weights.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".part")
        tmp.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x" and os.listdir(tmp_path) == [target.name]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == [target.name]
    # A name at the length limit still gets a valid temporary name.
    long_name = tmp_path / ("n" * MAX_NAME_BYTES)
    atomic_write(long_name, b"ok")
    assert long_name.read_bytes() == b"ok"


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": "ü"})
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "a": "ü",\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "d.json", {"x": float("nan")})
    assert not (tmp_path / "d.json").exists()


def test_write_new_file_never_overwrites(tmp_path):
    paths = [write_new_file(tmp_path, "img", ".png", bytes([i])) for i in range(3)]
    assert [p.name for p in paths] == ["img.png", "img-1.png", "img-2.png"]
    assert [p.read_bytes() for p in paths] == [b"\0", b"\1", b"\2"]
    with pytest.raises(UsageError, match="at most 255 bytes"):
        write_new_file(tmp_path, "x" * 260, ".png", b"")


@pytest.mark.parametrize(("value", "expected"), [
    ("my run", "my_run"), ("../../etc/passwd", "etc_passwd"), ("a\0b", "a_b"), ("\0", ""), ("..", ""),
    ("Schnee 雪", "Schnee"), (12, "12"), (".hidden", "hidden"),
])
def test_safe_name(value, expected):
    assert safe_name(value) == expected


def test_check_name_length():
    check_name_length("a" * MAX_NAME_BYTES, "the id")
    with pytest.raises(UsageError, match="the id gives the file name .* of 256 bytes"):
        check_name_length("a" * 256, "the id")
    with pytest.raises(UsageError):
        check_name_length("é" * 128, "the id")  # 256 bytes in UTF-8


def test_next_counter(tmp_path):
    assert next_counter(tmp_path, "look", "_.safetensors") == 1
    for name in ("look_00001_.safetensors", "look_00007_.safetensors", "look_x_.safetensors",
                 "looked_00009_.safetensors", "look__.safetensors", "look_00003_.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_counter(tmp_path, "look", "_.safetensors") == 8
    assert next_counter(tmp_path / "missing", "look", "_.png") == 1
