"""Fixtures of the training tests: a tiny data folder and exact (one-thread) CPU kernels."""
from __future__ import annotations

import pytest
import torch

from tbac_core.demo.scenes import split_scenes, write_caption_folder, write_edit_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 caption pairs + 2 edit triples at the fixture's 64x64 size."""
    folder = tmp_path_factory.mktemp("data")
    train, _ = split_scenes(24, 0)
    write_caption_folder(folder, train[:4], 64, 1, seed=0)
    write_edit_folder(folder / "edits", train, 64, 2, seed=0, kinds=("colour", "shape"))  # "make the ..." / "turn the ..."
    return folder


@pytest.fixture
def one_thread():
    """CPU kernels split reductions across threads in run-dependent ways; one thread is exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
