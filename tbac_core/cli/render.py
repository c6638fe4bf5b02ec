"""Rendering one job with the pipeline, and the parameter record each output PNG carries."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image

from .. import __version__
from ..io import encode_png, write_new_file
from ..ladder import parse_layer_spec
from ..params import SamplingParams
from .checkpoint_info import CheckpointInfo
from .images import InputImage, fit_init_image, load_input_image
from .jobs import Job


def model_record(model, info: CheckpointInfo) -> dict:
    identity = model.identity
    return {"name": identity.name, "fingerprint": identity.fingerprint,
            "dtype": str(model.dit.dtype).replace("torch.", ""), "config_sha256": info.config_sha256}


def job_record(job: Job, width: int, height: int, inputs: list[InputImage], init: InputImage | None) -> dict:
    """The part of an output's record that the job and the checkpoint's config decide (no model needed)."""
    return {
        "tbac_core_version": __version__,
        "mode": job.mode,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "image_guidance": job.image_guidance if job.mode == "edit" else None,
        "width": width,
        "height": height,
        "sampler": job.sampler,
        "layers": job.layers,
        "num_images": job.num_images,
        "denoise": job.strength if job.mode == "img2img" else None,
        "init_image": init.record if init is not None else None,
        "input_images": [item.record for item in inputs],
        **job.accelerations,  # only when on: an exact render's record is unchanged
    }


def job_parameters(job: Job, model, info: CheckpointInfo, width: int, height: int, inputs: list[InputImage],
                   init: InputImage | None, index: int) -> dict:
    """The record stored in output ``index`` of ``job``: everything needed to render it again."""
    identity = model.identity
    return {
        **job_record(job, width, height, inputs, init),
        "block_rungs": parse_layer_spec(job.layers, identity.num_rungs, identity.num_dit_blocks),
        "image_index": index,
        "model": model_record(model, info),
    }


def output_size(job: Job, info: CheckpointInfo, init: InputImage | None) -> tuple[int, int]:
    """The size ``job`` renders at: the init image's (fitted), else the asked or trained size."""
    if init is not None:
        return fit_init_image(init.image, job.width, job.height, info.latent_factor).size
    return job.width or info.default_size, job.height or info.default_size


def render(pipe, job: Job, info: CheckpointInfo, *, load_image: Callable[[str], InputImage] = load_input_image,
           callback=None) -> list[tuple[Image.Image, dict]]:
    """Run ``job`` with the library's one-call methods; returns ``(image, parameters)`` per output.

    The pipeline keeps recent conditionings, so a job with the same prompt, negative prompt, input
    images and layers as a recent one does not run the MLLM again.
    """
    common = dict(negative_prompt=job.negative_prompt, steps=job.steps, guidance_scale=job.guidance,
                  sampler=job.sampler, seed=job.seed, num_images_per_prompt=job.num_images, layers=job.layers,
                  cache_threshold=job.cache_threshold, cache_max_skips=job.cache_max_skips,
                  guidance_cutoff=job.guidance_cutoff, callback=callback)
    inputs = [load_image(path) for path in job.images]
    init = load_image(job.init_image) if job.init_image else None
    if inputs:
        width, height = pipe.resolve_size(job.width, job.height)
        output = pipe.edit(job.prompt, images=[item.image for item in inputs], width=width, height=height,
                           image_guidance_scale=job.image_guidance, **common)
    elif init is not None:
        start = fit_init_image(init.image, job.width, job.height, info.latent_factor)
        width, height = start.size
        output = pipe.generate(job.prompt, init_image=start, denoise=job.strength, **common)
    else:
        width, height = pipe.resolve_size(job.width, job.height)
        output = pipe.generate(job.prompt, width=width, height=height, **common)
    return [(image, job_parameters(job, pipe.model, info, width, height, inputs, init, k))
            for k, image in enumerate(output.images)]


def batch_key(job: Job) -> tuple | None:
    """Jobs with equal keys can be denoised as one batch (throughput mode): text-to-image jobs that
    differ only in prompt and seed. None: this job renders alone (edits and image-to-image, whose
    inputs differ per job, and step caching, which decides per batch and so would not give the
    images of the job rendered alone)."""
    if job.mode != "generate" or job.cache_threshold > 0:
        return None
    return (job.negative_prompt, job.steps, job.guidance, job.width, job.height, job.sampler, job.layers,
            job.num_images, job.guidance_cutoff)


def render_together(pipe, jobs: list[Job], info: CheckpointInfo, callback=None) -> list[list[tuple[Image.Image, dict]]]:
    """Jobs of one ``batch_key`` with their denoising as one DiT batch -> per job ``(image, parameters)``.

    Each job keeps its own seed's noise (``prompt_seeds``) and is decoded alone, so its images are
    the ones ``render`` gives it (within float rounding of the batched matrix products). The batch's
    DiT memory is checked against the device's free memory before the first step.
    """
    # torch: only once something renders (fast --help)
    from ..processing import images_to_uint8

    first = jobs[0]
    width, height = pipe.resolve_size(first.width, first.height)
    params = SamplingParams(steps=first.steps, guidance_scale=first.guidance, image_guidance_scale=1.0,
                            sampler=first.sampler,
                            num_images_per_prompt=first.num_images, guidance_cutoff=first.guidance_cutoff)
    cond = pipe.encode_prompt([job.prompt for job in jobs], negative_prompt=first.negative_prompt,
                              layers=first.layers)
    latents = pipe.sample(cond, width=width, height=height, params=params, callback=callback,
                          prompt_seeds=[job.seed for job in jobs], check_memory=True)
    results = []
    for index, job in enumerate(jobs):
        own = latents[index * job.num_images:(index + 1) * job.num_images]  # [num_images, C, h, w]
        images = [Image.fromarray(array) for array in images_to_uint8(pipe.decode(own))]
        results.append([(image, job_parameters(job, pipe.model, info, width, height, [], None, k))
                        for k, image in enumerate(images)])
    return results


def write_new_png(folder: Path, stem: str, image: Image.Image, parameters: dict) -> Path:
    """``image`` with its parameters as ``<stem>.png`` (``<stem>-1.png`` ... when taken): never overwrite."""
    return write_new_file(folder, stem, ".png", encode_png(image, parameters))
