"""A newcomer's first run of a template: the missing checkpoint and an empty prompt say what is wrong."""
from __future__ import annotations

import logging

from pack import PACK

bridge = PACK.nodes.comfy_bridge
Loader = PACK.nodes.loader.TBACModelLoader


def test_missing_checkpoint_says_what_to_download_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path))  # an empty models/tbac
    message = Loader.validate_inputs(checkpoint="TBAC-UniImage-3B")
    assert isinstance(message, str)
    for part in ("'TBAC-UniImage-3B' is not installed", str(tmp_path), "TencentBAC/TBAC-UniImage-3B",
                 "models/tbac/TBAC-UniImage-3B/", "'demo'"):
        assert part in message, message
    assert Loader.validate_inputs(checkpoint="demo") is True
    assert Loader.validate_inputs(checkpoint=None) is True  # a linked input is checked when it runs


def test_installed_checkpoint_passes_the_check(monkeypatch, tmp_path, fixture_root):
    (tmp_path / "tbac-tiny").symlink_to(fixture_root / "checkpoint", target_is_directory=True)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path))
    assert Loader.validate_inputs(checkpoint="tbac-tiny") is True
    assert "tbac-tiny" in Loader.validate_inputs(checkpoint="TBAC-UniImage-3B")  # lists what it found


def test_empty_prompt_logs_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt("a red circle")
    assert not [r for r in caplog.records if "empty" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt(["a red circle", "  "])
    warnings = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert warnings == [("Prompt 2 is empty: the image is generated with no text to follow. Type a prompt if that "
                         "is not what you want.")]
