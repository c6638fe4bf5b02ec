"""Helpers of the training tests: load the tiny checkpoint for training, a small TrainConfig."""
from __future__ import annotations

from tbac_core.loading import load_model
from tbac_core.modeling.model import TBACModel
from tbac_core.training import TrainConfig


def load(checkpoint_dir) -> TBACModel:
    return load_model(checkpoint_dir, dtype="fp32", device="cpu")


def config(tmp_path, data_dir, **overrides) -> TrainConfig:
    settings = dict(data=[str(data_dir)], output_dir=str(tmp_path / "run"), max_steps=4, batch_size=4,
                    learning_rate=1e-3, warmup_steps=0, save_every=0, sample_every=0, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)
