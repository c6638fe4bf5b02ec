"""The sampler node's live previews and noise masks, through the comfy_api double."""
from __future__ import annotations

import pytest
import torch
from graph_runner import make_models_root
from pack import PACK, outputs

bridge = PACK.nodes.comfy_bridge
loader = PACK.nodes.loader
generate = PACK.nodes.generate
STEPS = 3


class RecordingBar:
    """Stands in for ``comfy.utils.ProgressBar``: records ``update_absolute`` calls."""

    def __init__(self, total):
        self.calls = []

    def update_absolute(self, value, total=None, preview=None):
        self.calls.append((value, total, preview))


@pytest.fixture(scope="module")
def model(tmp_path_factory, fixture_root):
    root = make_models_root(tmp_path_factory.mktemp("models") / "tbac", fixture_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bridge.MODELS_DIR_ENV, str(root))
        (loaded,) = outputs(loader.TBACModelLoader, checkpoint="tbac-tiny", dtype="fp32", device="cpu", adapter="none")
        yield loaded


def _conditioning(model, prompt="a cat", images=None):
    (cond,) = outputs(generate.TBACLadderEncode, model=model, prompt=prompt, negative_prompt="", layers="default",
                      keep_all_rungs=False, one_prompt_per_line=False, images=images)
    return cond


def _sample(model, cond, **kwargs):
    options = dict(seed=5, steps=STEPS, guidance=4.5, image_guidance=1.5, width=96, height=64, batch_size=1,
                   sampler="euler", denoise=1.0, latent=None)
    options.update(kwargs)
    return outputs(generate.TBACSampler, model=model, conditioning=cond, **options)[0]


def _recording_bars(monkeypatch) -> list:
    bars = []
    monkeypatch.setattr(bridge, "progress_bar", lambda total: bars.append(RecordingBar(total)) or bars[-1])
    return bars


def test_sampler_sends_a_jpeg_preview_per_step(model, monkeypatch):
    bars = _recording_bars(monkeypatch)
    _sample(model, _conditioning(model))
    (bar,) = bars
    assert [(value, total) for value, total, _ in bar.calls] == [(1, STEPS), (2, STEPS), (3, STEPS)]
    for _, _, (kind, image, max_size) in bar.calls:
        assert (kind, image.mode, image.size, max_size) == ("JPEG", "RGB", (96, 64), 512)


def test_previews_follow_the_users_preview_setting(model, monkeypatch):
    bars = _recording_bars(monkeypatch)
    monkeypatch.setattr(bridge, "preview_max_size", lambda: None)  # ComfyUI's --preview-method none
    _sample(model, _conditioning(model))
    assert [preview for _, _, preview in bars[0].calls] == [None] * STEPS


def test_masked_sampling_keeps_the_unmasked_pixels(model):
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (encoded,) = outputs(generate.TBACEncodeImage, model=model, images=images, crop_to_multiple=True)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0  # SetLatentNoiseMask's layout: [B, H, W], 1 = may change
    for cond in (_conditioning(model), _conditioning(model, "make it purple", images=images)):  # plain, edit
        latent = _sample(model, cond, latent={**encoded, "noise_mask": mask}, width=64)
        assert latent["noise_mask"] is mask
        (plain,) = outputs(generate.TBACDecode, model=model, latent=latent, tiling="off")
        (pasted,) = outputs(generate.TBACDecode, model=model, latent=latent, tiling="off", original_images=images)
        outside = mask[0] == 0
        assert torch.equal(pasted[:, outside], images[:, outside])
        assert torch.equal(pasted[:, ~outside], plain[:, ~outside])
