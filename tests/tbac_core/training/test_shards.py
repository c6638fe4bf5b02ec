"""WebDataset tar shards: the same examples as the folder reader, resumable positions, clear errors."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from training_support import config, load

from tbac_core.errors import InvalidParameterError
from tbac_core.training import Trainer, TrainingData, scan_folder
from tbac_core.training.shards import ShardStream, read_shard, write_shards
from tbac_core.training.trainer import open_training_data

SIZE = 64


def pixels_key(text: str, target: torch.Tensor, sources) -> tuple:
    return (text, target.numpy().tobytes(), tuple(s.tobytes() for s in sources))


def test_shards_stream_the_same_examples_as_the_folder(data_dir, tmp_path):
    examples = scan_folder(data_dir)
    paths = write_shards(examples, tmp_path, per_shard=4)
    assert len(paths) == 2 and all(p.name.endswith(".tar") for p in paths)

    folder = TrainingData(examples, SIZE).batch(list(range(len(examples))))
    stream = open_training_data([str(tmp_path / "shard-*.tar")], SIZE)
    assert isinstance(stream, ShardStream)
    streamed = stream.batch_for(0, len(examples), 0, list(range(len(examples))))
    expected = sorted(pixels_key(t, x, s) for t, x, s in zip(folder.texts, folder.targets, folder.sources))
    got = sorted(pixels_key(t, x, s) for t, x, s in zip(streamed.texts, streamed.targets, streamed.sources))
    assert got == expected  # one epoch: every example once, pixel for pixel
    assert sum(bool(s) for s in streamed.sources) == 2


def test_stream_positions_do_not_depend_on_how_it_got_there(data_dir, tmp_path):
    write_shards(scan_folder(data_dir), tmp_path, per_shard=4)
    continuous = ShardStream.from_paths([str(tmp_path / "*.tar")], SIZE)
    batches = [continuous.batch_for(step, 4, 3, [0, 1, 2, 3]).texts for step in range(3)]  # crosses epochs
    resumed = ShardStream.from_paths([str(tmp_path / "*.tar")], SIZE)
    assert resumed.batch_for(2, 4, 3, [0, 1, 2, 3]).texts == batches[2]
    assert resumed.batch_for(2, 4, 3, [2, 3]).texts == batches[2][2:]  # a process's slice
    assert continuous.sample_captions(2) == resumed.sample_captions(2) and len(continuous.sample_captions(2)) == 2


def test_trainer_steps_on_streamed_shards(checkpoint_dir, data_dir, tmp_path):
    write_shards(scan_folder(data_dir), tmp_path / "shards", per_shard=3)
    trainer = Trainer(load(checkpoint_dir), config(tmp_path, str(tmp_path / "shards" / "*.tar"), max_steps=1))
    result = trainer.train()
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    with pytest.raises(InvalidParameterError, match="mixes folders and tar shards"):
        open_training_data([str(data_dir), str(tmp_path / "shards" / "*.tar")], SIZE)


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_malformed_shards_are_named_in_clear_errors(data_dir, tmp_path):
    png = (data_dir / "00000.png").read_bytes()
    write_tar(tmp_path / "no_caption.tar", {"a.png": png, "b.png": png, "b.txt": b"x"})
    with pytest.raises(InvalidParameterError, match=r"no_caption.tar: example a has no a.txt caption"):
        list(read_shard(tmp_path / "no_caption.tar"))
    write_tar(tmp_path / "split.tar", {"a.png": png, "a.txt": b"x", "b.png": png, "b.txt": b"y", "a.json": b"{}"})
    with pytest.raises(InvalidParameterError, match="not adjacent"):
        list(read_shard(tmp_path / "split.tar"))
    write_tar(tmp_path / "long.tar", {"a.png": png, "a.txt": b"x" * 70_000})
    with pytest.raises(InvalidParameterError, match="a.txt is 70000 bytes; at most 65536"):
        list(read_shard(tmp_path / "long.tar"))
    write_tar(tmp_path / "good.tar", {"a.png": png, "a.txt": b"x", "b.png": png, "b.txt": b"y"})
    whole = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: 1024 + len(png) + 1024 + 512 + 100])  # inside b.png
    with pytest.raises(InvalidParameterError, match="cut.tar is not a readable tar shard"):
        list(read_shard(tmp_path / "cut.tar"))
    write_tar(tmp_path / "bad_image.tar", {"a.png": b"not a png", "a.txt": b"x"})
    with pytest.raises(InvalidParameterError, match=r"Cannot read training image .*bad_image.tar:a \(target\)"):
        ShardStream.from_paths([tmp_path / "bad_image.tar"], SIZE).batch_for(0, 1, 0, [0])
    write_tar(tmp_path / "empty.tar", {})
    with pytest.raises(InvalidParameterError, match="hold no examples"):
        ShardStream.from_paths([tmp_path / "empty.tar"], SIZE).batch_for(0, 1, 0, [0])
    with pytest.raises(InvalidParameterError, match="No tar shard matches"):
        ShardStream.from_paths([str(tmp_path / "nothing-*.tar")], SIZE)
