"""Make the Templates dialog's thumbnails from real runs: example_workflows/<name>.jpg for every template.

    python tools/make_thumbnails.py --server http://127.0.0.1:8188

ComfyUI's front end (1.45) shows a custom-node template's card image from
``/api/workflow_templates/<pack>/<name>.jpg``, i.e. ``example_workflows/<name>.jpg`` beside
``<name>.json``. This script runs each template's API twin on a running ComfyUI that has the pack
installed, with the built-in demo model (the loader's ``demo``; 32x32, its own tuned steps and
guidance from its config.json) and prompts in the demo's vocabulary, then draws a 256x256 JPEG
(~10 KB): the generated image, or input -> output for the image templates, or input + answer for
understanding. Every card shows what the demo really does, never a picture from elsewhere.
Standard library + Pillow; it talks only to the server given.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "example_workflows"
DEMO_CONFIG = ROOT / "tbac_core" / "demo" / "checkpoint" / "config.json"
THUMB = 256
RUN_DEADLINE_S = 600
INPUT_NAME = "tbac_thumbnail_input.png"
# Prompts the demo knows (one coloured shape on a coloured background), per template and encode node order.
PROMPTS = {
    "text_to_image": ["a red circle on a blue background"],
    "batch_prompts": [(
        "a red circle on a blue background\na yellow square on a green background\na white triangle on a black background"
    )],
    "ladder_mix": ["a red circle on a blue background", "a yellow square on a green background"],
    "image_to_image": ["a yellow circle on a purple background"],
    "inpaint": ["a white circle on a red background"],
    "masked_edit": ["make the circle white"],
    "edit_image": ["make the circle green"],
    "ksampler_tbac": ["a yellow square on a green background"],
}
INPUT_PROMPT = "a red circle on a blue background"


def _post(server: str, path: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(server + path, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _get(server: str, path: str) -> bytes:
    with urllib.request.urlopen(server + path, timeout=60) as answer:
        return answer.read()


def upload(server: str, image: Image.Image) -> str:
    """POST /upload/image (multipart, stdlib only); returns the name LoadImage takes."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{INPUT_NAME}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return _post(server, "/upload/image", body, f"multipart/form-data; boundary={boundary}")["name"]


def run(server: str, prompt: dict) -> dict:
    """Queue an API prompt and wait (RUN_DEADLINE_S) for its outputs: {node_id: output}."""
    answer = _post(server, "/prompt", json.dumps({"prompt": prompt}).encode(), "application/json")
    if answer.get("node_errors"):
        raise RuntimeError(f"ComfyUI refused the prompt: {answer['node_errors']}")
    prompt_id, start = answer["prompt_id"], time.monotonic()
    while time.monotonic() - start < RUN_DEADLINE_S:
        time.sleep(1)
        entry = json.loads(_get(server, f"/history/{prompt_id}")).get(prompt_id)
        if entry and entry["status"].get("completed"):
            return entry["outputs"]
        if entry and entry["status"].get("status_str") == "error":
            raise RuntimeError(f"the run failed: {entry['status']['messages'][-1]}")
    raise TimeoutError(f"prompt {prompt_id} not finished after {RUN_DEADLINE_S} s")


def output_images(server: str, outputs: dict) -> list[Image.Image]:
    images = []
    for out in outputs.values():
        for item in out.get("images", []):
            query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
            images.append(Image.open(io.BytesIO(_get(server, f"/view?{query}"))).convert("RGB"))
    return images


def for_demo(name: str, workflow: dict, input_name: str) -> dict:
    """The API twin with the demo model, its tuned settings, demo prompts and the uploaded input."""
    settings = json.loads(DEMO_CONFIG.read_text())["demo_defaults"]
    prompts = list(PROMPTS.get(name, []))
    for node_id in sorted(workflow, key=int):
        node, inputs = workflow[node_id], workflow[node_id]["inputs"]
        kind = node["class_type"]
        if kind == "TBACModelLoader":
            inputs["checkpoint"] = "demo"
        elif kind == "TBACSampler":
            inputs.update(width=settings["width"], height=settings["height"], steps=settings["steps"],
                          guidance=settings["guidance_scale"])
        elif kind == "KSampler":  # the core sampler on TBAC Native Model: the demo's steps, its guidance as cfg
            inputs.update(steps=settings["steps"], cfg=settings["guidance_scale"])
        elif kind == "EmptyLatentImage":
            inputs.update(width=settings["width"], height=settings["height"])
        elif kind == "TBACLadderEncode" and prompts and not isinstance(inputs["prompt"], list):
            inputs["prompt"] = prompts.pop(0)
        elif kind == "TBACUnderstand":  # the demo was taught the "describe in detail" preset (its captions)
            inputs.update(max_new_tokens=12, preset="describe in detail", question="")
        elif kind == "LoadImage":
            inputs["image"] = input_name
    return workflow


def tile(image: Image.Image, side: int) -> Image.Image:
    return image.resize((side, side), Image.NEAREST)  # the demo paints 32x32: keep its pixels crisp


def compose(inputs: list[Image.Image], outputs: list[Image.Image], text: str | None) -> Image.Image:
    card = Image.new("RGB", (THUMB, THUMB), (24, 24, 28))
    draw = ImageDraw.Draw(card)
    if text is not None:  # understanding: the picture, then the start of the answer
        card.paste(tile(inputs[0], 160), (48, 12))
        draw.multiline_text((12, 182), _wrap(text, 38, 4), fill=(230, 230, 230))
    elif inputs:  # input -> output
        card.paste(tile(inputs[0], 112), (8, 72))
        card.paste(tile(outputs[0], 112), (136, 72))
        draw.polygon([(122, 120), (132, 128), (122, 136)], fill=(230, 230, 230))
    elif len(outputs) > 1:  # a batch: a grid
        side = THUMB // 2
        for n, image in enumerate(outputs[:4]):
            card.paste(tile(image, side - 8), ((n % 2) * side + 4, (n // 2) * side + 4))
    else:
        card.paste(tile(outputs[0], THUMB), (0, 0))
    return card


def _wrap(text: str, width: int, lines: int) -> str:
    words, out, line = " ".join(text.split()).split(" "), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            out.append(line)
            line = ""
        line = f"{line} {word}".strip()
    out.append(line)
    return "\n".join(out[:lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="a ComfyUI with this pack installed, e.g. http://127.0.0.1:8188")
    parser.add_argument("--only", default="", help="comma-separated template names")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")
    names = [p.stem for p in sorted(TEMPLATES.glob("*.json"))]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    # the input picture for the image templates: a demo generation, with the right half as the mask
    first = for_demo("text_to_image", json.loads((TEMPLATES / "api" / "text_to_image.json").read_text()), "")
    first[next(i for i, n in first.items() if n["class_type"] == "TBACLadderEncode")]["inputs"]["prompt"] = INPUT_PROMPT
    source = output_images(server, run(server, first))[0]
    masked = source.convert("RGBA")
    alpha = Image.new("L", masked.size, 255)
    alpha.paste(0, (masked.width // 2, 0, masked.width, masked.height))  # LoadImage: mask = 1 - alpha
    masked.putalpha(alpha)
    status = 0
    for name in names:
        workflow = json.loads((TEMPLATES / "api" / f"{name}.json").read_text())
        uses_image = any(n["class_type"] == "LoadImage" for n in workflow.values())
        input_name = upload(server, masked if name in ("inpaint", "masked_edit") else source) if uses_image else ""
        try:
            outputs = run(server, for_demo(name, workflow, input_name))
        except (RuntimeError, TimeoutError) as exc:
            print(f"FAIL {name}: {exc}")
            status = 1
            continue
        texts = [str(t) for out in outputs.values() for t in out.get("text", [])]
        # generated pictures have the demo's size; the inspect plot of ladder_mix is larger and left out
        images = [img for img in output_images(server, outputs) if img.size == source.size]
        card = compose([source] if uses_image else [], images, texts[0] if texts and not images else None)
        path = TEMPLATES / f"{name}.jpg"
        card.save(path, quality=85, optimize=True)
        print(f"ok   {name}: {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")
    return status


if __name__ == "__main__":
    sys.exit(main())
