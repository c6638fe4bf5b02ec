"""PNG parameter chunks: round trip and refusals."""
from __future__ import annotations

import numpy as np
import pytest
from cli_support import pixels
from PIL import Image

from tbac_core.io.pngmeta import read_parameters


def test_pngmeta_round_trip_and_refusals(tmp_path):
    from tbac_core.io.pngmeta import (
        INFOTEXT_KEY,
        PNGMetadataError,
        encode_png,
        format_infotext,
    )

    params = {"prompt": "ein Hund im Schnee, 雪", "negative_prompt": "", "seed": 2**63, "steps": 2, "guidance": 4.5,
              "width": 64, "height": 32, "sampler": "dpm++", "layers": "16-35:2, final", "image_index": 0,
              "model": {"name": "m", "fingerprint": "abcdef0123456789"}, "tbac_core_version": "0.1.0"}
    image = Image.fromarray(np.arange(64 * 32 * 3, dtype=np.uint8).reshape(32, 64, 3))
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(image, params))
    assert read_parameters(path) == params
    np.testing.assert_array_equal(pixels(path), np.asarray(image))
    with Image.open(path) as opened:
        assert opened.text[INFOTEXT_KEY] == format_infotext({"schema": 1, **params})
    assert format_infotext(params).splitlines() == [
        "ein Hund im Schnee, 雪",  # no negative prompt line when it is empty
        'Steps: 2, Sampler: dpm++, CFG scale: 4.5, Seed: 9223372036854775808, Size: 64x32, Model: m, '
        'Model hash: abcdef0123, Layers: "16-35:2, final", Batch pos: 0, Version: tbac_core 0.1.0',
    ]
    image.save(tmp_path / "plain.png")
    with pytest.raises(PNGMetadataError, match="no 'tbac_parameters' text chunk"):
        read_parameters(tmp_path / "plain.png")
    image.save(tmp_path / "b.jpg")
    with pytest.raises(PNGMetadataError, match="JPEG file, not a PNG"):
        read_parameters(tmp_path / "b.jpg")
