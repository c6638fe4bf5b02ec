"""Memory modes and the conditioning cache of TBACPipeline."""
from __future__ import annotations

import pytest
import torch

from tbac_core.errors import InvalidParameterError
from tbac_core.params import MEMORY_MODES
from tbac_core.pipeline.placement import MemoryModePlacement
from tbac_core.pipeline.tbac_pipeline import TBACPipeline


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_every_memory_mode_gives_the_same_image(pipe, mode):
    reference = pipe.generate("a red cat", steps=2, seed=1).latents
    other = TBACPipeline(pipe.model, memory=mode, device="cpu")
    torch.testing.assert_close(other.generate("a red cat", steps=2, seed=1).latents, reference, atol=0, rtol=0)


@pytest.mark.parametrize("mode, homes", [
    ("full", {"mllm": "cuda", "dit": "cuda", "vae": "cuda"}),
    ("offload-mllm", {"mllm": "cpu", "dit": "cuda", "vae": "cuda"}),
    ("sequential", {"mllm": "cpu", "dit": "cpu", "vae": "cpu"}),
])
def test_where_parts_rest(mode, homes):
    placement = MemoryModePlacement.__new__(MemoryModePlacement)
    placement.mode, placement.device, placement.offload_device = mode, torch.device("cuda"), torch.device("cpu")
    assert {part: placement._home(part).type for part in homes} == homes


def test_unknown_mode_refused(pipe):
    with pytest.raises(InvalidParameterError, match="offload-mllm"):
        TBACPipeline(pipe.model, memory="lowvram")


def test_conditioning_cache_reuses_and_is_bounded(pipe, monkeypatch):
    calls = []
    original = pipe.model.encode
    monkeypatch.setattr(pipe.model, "encode", lambda *a, **k: calls.append(a) or original(*a, **k))
    cached = TBACPipeline(pipe.model, cache_size=2, device="cpu")
    first = cached.encode("a cat")
    assert cached.encode("a cat") is first and len(calls) == 1
    cached.encode("a dog")
    cached.encode("a bird")
    assert len(cached._cache) == 2
    cached.encode("a cat")
    assert len(calls) == 4  # evicted, encoded again
    uncached = TBACPipeline(pipe.model, cache_size=0, device="cpu")
    uncached.encode("a cat")
    uncached.encode("a cat")
    assert len(calls) == 6 and len(uncached._cache) == 0


def test_compile_switch_compiles_the_dit_blocks(checkpoint_dir):
    from tbac_core import load_model

    model = load_model(checkpoint_dir, device="cpu", dtype="fp32")
    TBACPipeline(model, compile_dit=True, device="cpu")
    assert all(block._compiled_call_impl is not None for block in model.dit.transformer.transformer_blocks)


class _MLLMCalls:
    """Batch rows of every decoder run and every vision-tower call of the MLLM."""

    def __init__(self, mllm):
        from tbac_core.modeling.mllm import text_model, vision_tower

        self.rows: list[int] = []
        self.images = 0
        self.handles = [
            text_model(mllm).layers[0].register_forward_pre_hook(
                lambda _m, args, kwargs: self.rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
                with_kwargs=True),
            vision_tower(mllm).register_forward_pre_hook(lambda _m, _args: setattr(self, "images", self.images + 1)),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _same(a, b) -> None:
    for source_a, source_b in zip(a.sources, b.sources):
        for name in ("positive", "negative", "image_negative"):
            x, y = getattr(source_a, name), getattr(source_b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_a_new_prompt_reuses_the_guidance_rows_states(pipe):
    from PIL import Image

    cached = TBACPipeline(pipe.model, cache_size=0, device="cpu")  # no request cache: only the row cache acts
    uncached = TBACPipeline(pipe.model, cache_size=0, guidance_cache_size=0, device="cpu")
    image = Image.new("RGB", (64, 48), (80, 120, 200))
    with _MLLMCalls(pipe.model.mllm) as calls:
        cached.encode("a cat", negative_prompt="blurry")
        assert calls.rows == [1, 1]  # the negative row alone, then the prompt row
        dog = cached.encode("a dog", negative_prompt="blurry")
        assert calls.rows == [1, 1, 1]  # only the new prompt's row ran
        cached.encode("a dog", negative_prompt="grey")
        assert calls.rows == [1, 1, 1, 1, 1]  # another negative prompt: its row runs
        calls.rows.clear()
        cached.encode("make it blue", images=[image])
        # The negative rows with the black and with the input image as one batch, then the instruction;
        # black and input image each seen once.
        assert calls.rows == [2, 1] and calls.images == 2
        calls.rows.clear()
        blue_to_red = cached.encode("make it red", images=[image])
        # Same input image and negative prompt: both guidance rows were kept, the instruction's row runs,
        # and the image's vision features were kept too.
        assert calls.rows == [1] and calls.images == 2
    # Reused states are the states an uncached encode computes, bit for bit.
    _same(dog, uncached.encode("a dog", negative_prompt="blurry"))
    _same(blue_to_red, uncached.encode("make it red", images=[image]))
    with _MLLMCalls(pipe.model.mllm) as calls:
        uncached.encode("a dog", negative_prompt="blurry")
        assert calls.rows == [1, 1]  # guidance_cache_size=0 keeps nothing
        calls.rows.clear()
        uncached.encode(["make it blue", "make it red"], images=[image])
        # Two prompts sharing the image: their identical guidance rows run once, the prompts together.
        assert calls.rows == [2, 2] and calls.images == 2


def test_guidance_row_cache_is_bounded_and_keyed_by_content_and_depth(pipe):
    from PIL import Image

    cached = TBACPipeline(pipe.model, cache_size=0, guidance_cache_size=1, device="cpu")
    cached.encode("a cat", negative_prompt="blurry")
    cached.encode("a cat", negative_prompt="grey")
    assert len(cached._guidance_rows) == 1  # the oldest negative row was dropped
    with _MLLMCalls(pipe.model.mllm) as calls:
        cached.encode("a cat", negative_prompt="blurry")
        cached.encode("a cat", negative_prompt="blurry", keep_all_rungs=True)  # deeper states: another entry
        cached.encode("make it blue", images=[Image.new("RGB", (64, 48), (1, 2, 3))], negative_prompt="blurry")
        cached.encode("make it blue", images=[Image.new("RGB", (64, 48), (1, 2, 4))], negative_prompt="blurry")
    # every guidance group missed: other text, depth or pixels (and the size-1 cache keeps one)
    assert calls.rows == [1, 1, 1, 1, 2, 1, 2, 1]
    assert len(cached._seen_images) == 2  # an edit's two images (input and black) for a cache of 1
    cached.clear_cache()
    assert len(cached._guidance_rows) == 0 and not cached._seen_images


def test_what_is_kept_between_encodes_waits_in_host_memory(pipe, monkeypatch):
    """Kept guidance states and vision features go through ``devices.to_host`` (kept heads are compact CPU
    copies), so on a GPU they leave its memory to what a run uses. On this CPU ``to_host`` is the
    identity, so the test makes it return new tensors and checks that the kept ones are those, and that
    results are unchanged."""
    from PIL import Image

    import tbac_core.modeling.mllm as mllm
    import tbac_core.modeling.model as model
    import tbac_core.modeling.prefix_kv as prefix_kv
    from tbac_core.devices import to_host

    hosted: list[torch.Tensor] = []

    def recording_to_host(tensor):
        hosted.append(to_host(tensor).clone())  # a new tensor: kept tensors must be these very ones
        return hosted[-1]

    for module in (mllm, model, prefix_kv):
        monkeypatch.setattr(module, "to_host", recording_to_host)
    cached = TBACPipeline(pipe.model, cache_size=0, device="cpu")
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    reference = TBACPipeline(pipe.model, cache_size=0, guidance_cache_size=0, device="cpu")
    for prompt, images in (("a cat", None), ("make it blue", [image])):
        _same(cached.encode(prompt, images=images), reference.encode(prompt, images=images))
    kept = {id(t) for t in hosted}
    assert len(cached._guidance_rows) == 2 and len(cached._seen_images) == 2  # text group, edit group; 2 images
    for states, head in cached._guidance_rows.values():
        assert id(states) in kept
        # On the CPU a head is copied by clone (a compact copy, not to_host); its tensors are CPU-resident.
        assert head is None or all(t.device.type == "cpu" for pair in head.layers for t in pair)
    assert all(id(features) in kept for _, features in cached._seen_images)
    # Kept states are reused as they are: a new prompt with the same negative row gives the uncached result.
    _same(cached.encode("a dog", images=None), reference.encode("a dog", images=None))


def test_recent_images_are_dropped_least_recently_used_first(pipe):
    """Edits of same-size images share their black image: it is used by every edit, so it stays known
    while older input images are dropped (first-in-first-out would drop it as the oldest entry)."""
    from PIL import Image

    cached = TBACPipeline(pipe.model, cache_size=0, guidance_cache_size=1, device="cpu")  # keeps 2 images
    red, green, blue = (Image.new("RGB", (64, 48), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200)))
    cached.encode("make it pale", images=[red])  # black and red seen
    cached.encode("make it pale", images=[green])  # black used again; green seen; red dropped
    with _MLLMCalls(pipe.model.mllm) as calls:
        cached.encode("make it pale", images=[blue])
    assert calls.images == 1  # only blue ran through the vision tower: the black image was still known
    with _MLLMCalls(pipe.model.mllm) as calls:
        cached.encode("make it pale", images=[red])
    assert calls.images == 1  # red had been dropped, black had not
    reference = TBACPipeline(pipe.model, cache_size=0, guidance_cache_size=0, device="cpu")
    _same(cached.encode("make it dark", images=[green]), reference.encode("make it dark", images=[green]))
