"""A training run's folder: resumable checkpoints, the optimizer state and the trainer state.

    output_dir/
      checkpoint-000500/   adapter files + optimizer.safetensors + trainer_state.json (written last)
      checkpoint-001000/
      final/               adapter files + trainer_state.json
      samples/             step-NNNNNN.png grids

Everything saved is whole tensors with no per-process state, so a run resumes with any number of
processes (sharded or not). The folder layout and the file formats live here; what is trained and
how it is gathered lives in ``training.parts`` / ``training.sharding``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import InvalidParameterError
from ..io.files import atomic_write
from .sharding import gather_full, shard_like

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
FINAL_NAME = "final"


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The run's complete checkpoints (their trainer state written), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` <= 0: keep all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def read_trainer_state(folder: Path) -> dict:
    """The trainer state of a resumable checkpoint folder, refusing an incomplete one."""
    state_path = folder / TRAINER_STATE
    if not state_path.is_file() or not (folder / OPTIMIZER_STATE).is_file():
        raise InvalidParameterError(
            f"{folder} is not a complete training checkpoint (needs {TRAINER_STATE} and {OPTIMIZER_STATE}); "
            f"resume from an output_dir/checkpoint-NNNNNN folder."
        )
    return json.loads(state_path.read_text(encoding="utf-8"))


def gather_optimizer_state(optimizer: torch.optim.Optimizer,
                           keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat whole tensors + JSON metadata (safetensors holds no nested objects).

    With FSDP, sharded state is gathered (every process must call it; ``keep``: see ``gather_full``).
    """
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return gather_full(tensors, keep), {"param_groups": state["param_groups"], "scalars": scalars}


def write_optimizer_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_file(tensors, str(folder / OPTIMIZER_STATE), metadata={"meta": json.dumps(meta)})


def read_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """A state dict for ``optimizer`` from ``folder``, laid out like its parameters (sharded or not)."""
    tensors = load_file(str(folder / OPTIMIZER_STATE))
    with safe_open(str(folder / OPTIMIZER_STATE), framework="pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    groups = meta["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise InvalidParameterError("The checkpoint's optimizer state does not fit this run's trained parameters.")
    params = [param for group in optimizer.param_groups for param in group["params"]]  # state index order
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        if not index.isdigit() or int(index) >= len(params):
            raise InvalidParameterError(f"The checkpoint's optimizer state has an entry {key!r} this run does not have.")
        state.setdefault(int(index), {})[name] = shard_like(value, params[int(index)])
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}
