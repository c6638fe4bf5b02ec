"""Two CPU processes (gloo, started by ``accelerate launch``) train exactly like one; resume across N."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_support import config, load

from tbac_core.loading.adapters import read_adapter_tensors
from tbac_core.training import Trainer

ROOT = Path(__file__).resolve().parents[3]
STEPS = 2
LAUNCH_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(checkpoint_dir, data_dir, out: Path, *extra: str) -> Path:
    """``accelerate launch`` of the train CLI: 2 processes x 2 accumulation micro-steps of 1 example."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "tbac_core", "train",
               "--model", str(checkpoint_dir), "--dtype", "fp32", "--data", str(data_dir), "--out", str(out),
               "--steps", str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--warmup", "0",
               "--save-every", "1", "--keep", "0", "--threads", "1", *extra]
    done = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out.parent / "launch.log").write_text(done.stdout + done.stderr)
    return out


@pytest.fixture(scope="module")
def two_process_run(checkpoint_dir, data_dir, tmp_path_factory) -> Path:
    return launch_two_processes(checkpoint_dir, data_dir, tmp_path_factory.mktemp("two") / "run",
                                "--sample-every", "0")


@pytest.fixture(scope="module")
def fsdp_run(checkpoint_dir, data_dir, tmp_path_factory) -> Path:
    """The same run with the DiT blocks sharded (FSDP), sampling a grid after each step."""
    return launch_two_processes(checkpoint_dir, data_dir, tmp_path_factory.mktemp("fsdp") / "run", "--fsdp",
                                "--sample-every", "1", "--sample-steps", "2", "--sample-prompt", "a red circle",
                                "--debug")


@pytest.fixture(scope="module")
def one_process_run(checkpoint_dir, data_dir, tmp_path_factory):
    """The same run in this process, no accumulation: losses and trained tensors after each step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = dict(max_steps=STEPS, save_every=1, keep_checkpoints=0)
        trainer = Trainer(load(checkpoint_dir), config(tmp_path_factory.mktemp("one"), data_dir, **settings))
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    states = [read_adapter_tensors(result.final_dir.parent / "checkpoint-000001"), read_adapter_tensors(result.final_dir)]
    return result.losses, states


def assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-5, rtol=1e-4), (key, (got[key] - value).abs().max())


def history(folder: Path) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [h["loss"] for h in state["history_tail"]]


@pytest.fixture(params=["ddp", "fsdp"])
def launched_run(request) -> Path:
    return request.getfixturevalue("two_process_run" if request.param == "ddp" else "fsdp_run")


def test_two_processes_train_like_one(launched_run, one_process_run):
    losses, states = one_process_run
    state = json.loads((launched_run / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["examples_seen"] == STEPS * 4
    assert history(launched_run / "final") == pytest.approx(losses, rel=1e-5)
    assert_close(read_adapter_tensors(launched_run / "checkpoint-000001"), states[0])
    assert_close(read_adapter_tensors(launched_run / "final"), states[1])


def test_fsdp_run_sharded_and_sampled(fsdp_run):
    state = json.loads((fsdp_run / "final" / "trainer_state.json").read_text())
    assert state["config"]["fsdp"] is True
    # Each of the 2 processes holds half of every block's parameters (FSDP2 pads dim 0 to a multiple of 2).
    held = re.findall(r"FSDP: process (\d) holds (\d+) of the DiT blocks' (\d+) parameters",
                      (fsdp_run.parent / "launch.log").read_text())
    assert sorted(rank for rank, _, _ in held) == ["0", "1"]
    assert all(int(local) * 2 == int(total) for _, local, total in held), held
    # Sampling gathers the sharded blocks on both processes; the main one writes the grid.
    assert sorted(p.name for p in (fsdp_run / "samples").glob("*.png")) == ["step-000001.png", "step-000002.png"]


def test_two_process_checkpoint_resumes_in_one_process(launched_run, one_process_run, checkpoint_dir,
                                                       data_dir, tmp_path, one_thread):
    losses, states = one_process_run
    resumed = Trainer(load(checkpoint_dir), config(tmp_path, data_dir, max_steps=STEPS,
                                                   resume=str(launched_run / "checkpoint-000001")))
    result = resumed.train()
    assert resumed.step == STEPS and result.losses == pytest.approx(losses[1:], rel=1e-5)
    assert_close(resumed.parts.state_dict(), states[1])


def test_fsdp_run_resumes_from_a_checkpoint(two_process_run, one_process_run, checkpoint_dir, data_dir, tmp_path):
    """A sharded run picks up full saved tensors (its own shard of the weights and the AdamW state)."""
    losses, states = one_process_run
    out = launch_two_processes(checkpoint_dir, data_dir, tmp_path / "run", "--fsdp", "--sample-every", "0",
                               "--resume", str(two_process_run / "checkpoint-000001"))
    assert history(out / "final")[-1] == pytest.approx(losses[-1], rel=1e-5)
    assert_close(read_adapter_tensors(out / "final"), states[1])


def test_a_launched_process_ends_with_its_code_and_flushed_output():
    """Under a multi-process launch the train CLI ends its process itself (no interpreter teardown)."""
    from tbac_core.training.distributed import end_launched_process

    script = ("import logging, sys\n"
              "from tbac_core.training.distributed import end_launched_process\n"
              "logging.basicConfig(stream=sys.stderr)\n"
              "print('saved', end='')\n"
              "logging.getLogger('x').warning('logged')\n"
              "end_launched_process(3)\n"
              "print('not reached')\n")
    env = dict(os.environ, WORLD_SIZE="2", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "saved")
    assert "logged" in done.stderr
    assert end_launched_process(3) == 3  # a plain run (no WORLD_SIZE) just returns it
