"""understand: the printed answer is the library's.

``main(argv, pipeline=pipe)`` runs in-process on the session's tiny pipeline; only the tests of
model loading load a checkpoint again.
"""
from __future__ import annotations

from PIL import Image

from tbac_core.cli import main


def test_understand_prints_the_answer(pipe, input_png, capsys):
    from tbac_core.params import GenerationSettings
    from tbac_core.pipeline.understanding import answer

    argv = ["understand", "--image", str(input_png), "--question", "What is red?", "--max-new-tokens", "6"]
    assert main(argv, pipeline=pipe) == 0
    printed = capsys.readouterr().out
    with Image.open(input_png) as image:
        expected = answer(pipe, "What is red?", images=[image.convert("RGB")],
                          settings=GenerationSettings(max_new_tokens=6))
    assert printed == expected + "\n" and expected.strip()
    assert main(["understand", "--preset", "no such preset"], pipeline=pipe) == 2
    assert "short caption" in capsys.readouterr().err  # the error lists the presets
