"""Every fenced command and code example of README.md is run here, or listed below with the reason it is not.

A command line is a line of a ```bash block (continuation lines joined, trailing comments dropped);
a Python example is a whole ```python block. ``test_every_readme_command_is_run_or_excluded`` fails
when README gains a command that is in neither RUN nor EXCLUDED, and when an entry here no longer
matches README, so the two cannot drift apart. Commands run with the built-in demo model (the CLI's
default) or the tiny fixture, in a temporary folder; the substitutions used are listed beside them.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_TIMEOUT_S = 300

# -- what is not run, and why ---------------------------------------------------------------------
EXCLUDED = {
    "git clone <this repo> tbac_uniimage && cd tbac_uniimage": "needs the public repository, which does not exist yet",
    "git clone <this repo> tbac_uniimage": "needs the public repository, which does not exist yet",
    "python3 -m venv .venv && . .venv/bin/activate": "environment setup; .ci/run makes its venvs the same way",
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": "network install; .ci/run installs torch",
    "pip install -r requirements.txt": "installs; .ci/run runs it in every stack",
    "pip install -r requirements-dev.txt": "installs; .ci/run runs it in every stack",
    "<ComfyUI's python> -m pip install -r tbac_uniimage/requirements.txt": "installs into a ComfyUI; .ci/run's "
    "comfy-floor stack does the same from ComfyUI's floor",
    "python -m pytest tests -q": "the suite itself (this test is part of it)",
    "cd ComfyUI/custom_nodes": "a ComfyUI checkout (tools/README.md, /work/comfy_check scripts)",
    'ln -s "$PWD/tests/fixtures/tbac-tiny" ../../models/tbac/tbac-tiny': "a ComfyUI layout; the fixture link is what "
    "tests/workflows does with make_models_root",
    "python -m tbac_core generate --model models/tbac/TBAC-UniImage-3B --prompt \"a fox\" --seed 7 --width 768 "
    "--height 512": "needs the 11 GB release; the same flags run on the demo in RUN",
    "python -m comfy_queue example_workflows/api/text_to_image.json rows.jsonl --out renders --server "
    "http://127.0.0.1:8188 --server http://127.0.0.1:8189": "needs two ComfyUI servers; tests/comfy_queue runs the "
    "client against a fake server",
    "python -m tbac_core train --model models/tbac/TBAC-UniImage-3B --data my_images/ --out runs/style --dit lora "
    "--lora-rank 16 --steps 2000 --batch-size 4 --lr 1e-4": "needs the release and a GPU; tests/tbac_core/training "
    "trains LoRA on the fixture",
    "accelerate launch --num_processes 8 -m tbac_core train --data my_images --out runs/cats --batch-size 64":
    "needs 8 GPUs",
}

# -- what is run: README command -> the command run (demo model; photo.png = a demo output) ---------------
DEMO_PROMPT = "a red circle on a blue background"
RUN_CLI = {
    'python -m tbac_core generate --prompt "a red circle on a blue background" --out outputs': None,
    'python -m tbac_core edit --image outputs/tbac_0_0.png --prompt "make the circle green" --out edited': None,
    'python -m tbac_core understand --image edited/tbac_0_0.png --question "Describe this image in detail."': None,
    'python -m tbac_core edit --image photo.png --prompt "make the sky purple" --out outputs': None,
    'python -m tbac_core understand --image photo.png --question "What is in this picture?"': None,
    "python -m tbac_core batch prompts.jsonl --out renders": None,
    "python -m tbac_core generate --from-png outputs/tbac_0_0.png --prefix again": None,
    'python -c "from tbac_core.demo.scenes import all_scenes, write_caption_folder as w; w(\'demo_data\', '
    'all_scenes()[:16], 32, 1, 0)"': None,
    "accelerate launch --multi_gpu --num_processes 2 -m tbac_core train --data demo_data --out runs/demo2 --steps 20 "
    "--batch-size 4 --threads 1": None,
}
# Python blocks, keyed by their first line; run with these text substitutions (the release -> the tiny fixture)
RUN_PYTHON = {
    "from tbac_core import TBACPipeline": {
        '"models/tbac/TBAC-UniImage-3B", dtype="auto"': '"{checkpoint}", dtype="float32"',
        "steps=30": "steps=2, width=64, height=64",
        "image_guidance_scale=1.5)": "image_guidance_scale=1.5, steps=2, width=64, height=64)",
        "width=512, height=768": "width=64, height=96",
    },
    "from tbac_core import GenerationSettings": {"max_new_tokens=200": "max_new_tokens=4"},
}


def readme_commands() -> list[tuple[str, str]]:
    """(language, command or block) for every fenced bash line and python block of README."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL):
        if lang == "python":
            found.append(("python", body))
        elif lang in ("bash", "sh"):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                line = re.sub(r"\s+", " ", line)
                if line and not line.startswith("#"):
                    found.append(("bash", line))
        else:  # a plain block (file trees): must hold no command that could hide here
            assert not re.search(r"^\s*(python|pip|bash|git)\b", body, re.MULTILINE), f"a command in a plain block:\n{body}"
    return found


def test_every_readme_command_is_run_or_excluded():
    commands = readme_commands()
    bash = {c for lang, c in commands if lang == "bash"}
    blocks = {c.splitlines()[0] for lang, c in commands if lang == "python"}
    unlisted = sorted(bash - set(EXCLUDED) - set(RUN_CLI)) + sorted(blocks - set(RUN_PYTHON))
    assert not unlisted, "README commands neither run nor excluded by tests/test_readme.py:\n" + "\n".join(unlisted)
    stale = sorted((set(EXCLUDED) | set(RUN_CLI)) - bash) + sorted(set(RUN_PYTHON) - blocks)
    assert not stale, "entries of tests/test_readme.py that README no longer has:\n" + "\n".join(stale)


def _cli(args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = args.replace("python -m", f"{sys.executable} -m", 1).replace("python -c", f"{sys.executable} -c", 1)
    command = command.replace("accelerate launch", f"{sys.executable} -m accelerate.commands.launch", 1)
    result = subprocess.run(command, check=False, shell=True, cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                            env={**_env(), "TBAC_MODEL": ""})
    assert result.returncode == 0, f"{args}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_readme_cli_commands_run_on_the_demo(workdir):
    """The CLI lines in README order: generate makes outputs/tbac_0_0.png, which edit/understand use as photo.png."""
    _cli('python -m tbac_core generate --prompt "a red circle on a blue background" --out outputs', workdir)
    first = workdir / "outputs" / "tbac_0_0.png"
    assert first.is_file(), sorted(p.name for p in (workdir / "outputs").iterdir())
    (workdir / "photo.png").write_bytes(first.read_bytes())
    _cli('python -m tbac_core edit --image photo.png --prompt "make the sky purple" --out outputs', workdir)
    answer = _cli('python -m tbac_core understand --image photo.png --question "What is in this picture?"', workdir)
    assert answer.stdout.strip() or answer.stderr.strip()
    (workdir / "prompts.jsonl").write_text(json.dumps({"id": "cat", "prompt": DEMO_PROMPT, "seed": 1}) + "\n")
    _cli("python -m tbac_core batch prompts.jsonl --out renders", workdir)
    assert (workdir / "renders" / "batch_manifest.jsonl").is_file()
    _cli("python -m tbac_core generate --from-png outputs/tbac_0_0.png --prefix again", workdir)
    _cli('python -c "from tbac_core.demo.scenes import all_scenes, write_caption_folder as w; '
         'w(\'demo_data\', all_scenes()[:16], 32, 1, 0)"', workdir)
    assert any((workdir / "demo_data").rglob("*.png"))
    # README's two-process training on that data, as written (2 gloo processes on the CPU, ~15 s)
    _cli("accelerate launch --multi_gpu --num_processes 2 -m tbac_core train --data demo_data --out runs/demo2 "
         "--steps 20 --batch-size 4 --threads 1", workdir)
    assert (workdir / "runs" / "demo2" / "final" / "adapter_model.safetensors").is_file()


def test_quick_start_generates_edits_and_understands_on_the_demo(tmp_path):
    """README's quick start as written: the demo draws the prompt, edits it as told, and describes the result."""
    from PIL import Image

    from tbac_core.demo.scenes import measure_scene

    _cli('python -m tbac_core generate --prompt "a red circle on a blue background" --out outputs', tmp_path)
    assert measure_scene(Image.open(tmp_path / "outputs" / "tbac_0_0.png")) == ("blue", "red")
    _cli('python -m tbac_core edit --image outputs/tbac_0_0.png --prompt "make the circle green" --out edited', tmp_path)
    assert measure_scene(Image.open(tmp_path / "edited" / "tbac_0_0.png")) == ("blue", "green")
    answer = _cli('python -m tbac_core understand --image edited/tbac_0_0.png --question "Describe this image in '
                  'detail."', tmp_path)
    assert answer.stdout.strip() == "a green circle on a blue background", answer.stdout


def test_readme_python_examples_run_on_the_tiny_fixture(checkpoint_dir, workdir, monkeypatch):
    blocks = {c.splitlines()[0]: c for lang, c in readme_commands() if lang == "python"}
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    for first_line, substitutions in RUN_PYTHON.items():
        code = blocks[first_line]
        for old, new in substitutions.items():
            assert old in code, f"README's example changed: {old!r} is gone from\n{code}"
            code = code.replace(old, new.format(checkpoint=checkpoint_dir))
        if first_line.startswith("from tbac_core import GenerationSettings"):
            namespace["img"] = namespace["out"].images[0]  # README's text: "img" is an image you have
        exec(compile(code, f"README.md python block ({first_line})", "exec"), namespace)  # noqa: S102 (README's own code)
    assert (workdir / "cat.png").is_file()
    assert namespace["images"].shape[1:3] == (96, 64) and isinstance(namespace["text"], str)
