"""The tiny Flux.1 (dev and schnell) and SD 3.5 pipelines: built offline in code, deterministic, and every
pipeline mode the farm uses (text2img, step-end callbacks, img2img, inpaint, save and reload) runs on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image

from worker.models import tiny_flux, tiny_sd3
from worker.models.t5_tokenizer import tiny_t5_tokenizer

SIZE = 64
STEPS = 3
T5_TOKENS = 32  # shorter than the pipelines' defaults (512, 256) to keep the encoder cheap


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., Any]
    text2img: type[DiffusionPipeline]
    img2img: type[DiffusionPipeline]
    inpaint: type[DiffusionPipeline]
    latents: tuple[int, ...]  # the shape of `latents` at a step end, one image of SIZE x SIZE


FLUX_LATENTS = (1, (SIZE // 16) ** 2, 64)  # 2x2 patches of the 16-channel, factor-8 latents, packed
FAMILIES = [
    Family("flux", tiny_flux.build, FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FLUX_LATENTS),
    Family(
        "flux-schnell", tiny_flux.build_schnell, FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FLUX_LATENTS
    ),
    Family(
        "sd3",
        tiny_sd3.build,
        StableDiffusion3Pipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
        (1, 16, SIZE // 8, SIZE // 8),
    ),
]


FLUX = [family for family in FAMILIES if family.name.startswith("flux")]


@cache
def built(family: Family) -> Any:
    """One pipeline of each family for the whole module: a build is cheap, but the tests need not repeat it."""
    pipeline = family.build()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(params=FAMILIES, ids=lambda family: family.name)
def family(request: pytest.FixtureRequest) -> Family:
    return request.param


@pytest.fixture
def pipe(family: Family) -> Any:
    return built(family)


def run(pipeline: Any, seed: int = 1, **kwargs: Any) -> Any:
    """The first image of a call at SIZE x SIZE and STEPS steps unless `kwargs` says otherwise."""
    options: dict[str, Any] = {
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": STEPS,
        "max_sequence_length": T5_TOKENS,
        "generator": torch.Generator().manual_seed(seed),
    }
    return pipeline("a red fox in snow", **(options | kwargs)).images[0]


@cache
def first_image(family: Family) -> Any:
    """`run` on the family's pipeline with the defaults, once: the reference several tests compare against."""
    return run(built(family))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_t5_tokenizer_is_made_offline() -> None:
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer("A red fox, naïve", padding="max_length", max_length=24).input_ids
    assert len(ids) == 24 and ids[-1] == tokenizer.pad_token_id
    assert tokenizer.unk_token_id not in ids and tokenizer.eos_token_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A red fox, naïve"


def test_two_builds_have_identical_weights(family: Family, pipe: Any) -> None:
    again = family.build()
    modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    assert len(modules) == (4 if family.name.startswith("flux") else 5)  # the VAE, the text encoders, the DiT
    for name, module in modules.items():
        first, second = module.state_dict(), getattr(again, name).state_dict()
        assert first.keys() == second.keys(), name
        for key, tensor in first.items():
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", f"{name}.{key}"
            assert torch.isfinite(tensor).all() and torch.equal(tensor, second[key]), f"{name}.{key}"
        assert not module.training, f"{name} is in training mode: dropout would make runs differ"
    assert not torch.equal(family.build(seed=1).transformer.proj_out.weight, pipe.transformer.proj_out.weight), (
        "the seed does not reach the weights"
    )


def test_text2img_is_repeatable(family: Family, pipe: Any) -> None:
    image = first_image(family)
    assert image.size == (SIZE, SIZE)
    assert np.asarray(image).std() > 0, "a flat image: nothing was decoded"
    assert same(run(pipe), image)
    assert not same(run(pipe, seed=2), image)


def test_step_end_callback_sees_latents_and_prompt_embeds(family: Family, pipe: Any) -> None:
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def record(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes.append((tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return tensors

    run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert len(shapes) == STEPS and len(set(shapes)) == 1
    latents, prompt_embeds = shapes[0]
    assert latents == family.latents
    if family.name.startswith("flux"):
        assert prompt_embeds == (1, T5_TOKENS, tiny_flux.T5_WIDTH)
    else:  # classifier-free guidance: the negative prompt's embeddings ride in the same batch
        assert prompt_embeds == (2, 77 + T5_TOKENS, tiny_sd3.T5_WIDTH)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_from_pipe(family: Family, pipe: Any, mode: str) -> None:
    steps: list[int] = []

    def count(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        steps.append(step)
        return tensors

    derived = getattr(family, mode).from_pipe(pipe)
    derived.set_progress_bar_config(disable=True)
    assert derived.transformer is pipe.transformer
    extra: dict[str, Any] = {}
    if mode == "inpaint":
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, SIZE // 2 :] = 255
        extra["mask_image"] = Image.fromarray(mask)
    outputs = []
    for value in (40, 200):
        source = Image.new("RGB", (SIZE, SIZE), (value, 90, 255 - value))
        # strength 1 would start from pure noise, which flow matching makes blind to the image
        outputs.append(
            run(derived, image=source, strength=0.75, num_inference_steps=4, callback_on_step_end=count, **extra)
        )
    assert steps == [*range(STEPS)] * 2
    assert all(output.size == (SIZE, SIZE) for output in outputs)
    assert not same(*outputs), "the output does not depend on the input image"


def test_save_and_reload_offline(family: Family, pipe: Any, tmp_path: Path) -> None:
    """The same weights and, with them in freshly allocated memory, the same pixels.

    `from_pretrained` leaves the weights where safetensors mapped them, at addresses not aligned as the CPU
    allocator aligns; the CPU matrix kernels then add in another order and the latents move by a float
    rounding (about 1e-7), which may flip a pixel by one level. Copied into new tensors they give the built
    pipeline's exact bytes, so nothing but that placement differs."""
    pipe.save_pretrained(tmp_path)
    reloaded = family.text2img.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is family.text2img
    assert reloaded.scheduler.config.items() >= {"shift": pipe.scheduler.config.shift}.items()
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            loaded = getattr(reloaded, name).state_dict()
            assert all(torch.equal(tensor, loaded[key]) for key, tensor in module.state_dict().items()), name
    built, mapped = np.asarray(first_image(family), dtype=int), np.asarray(run(reloaded), dtype=int)
    assert np.abs(built - mapped).max() <= 1
    with torch.no_grad():
        for module in reloaded.components.values():
            if isinstance(module, torch.nn.Module):
                for parameter in module.parameters():
                    parameter.data = parameter.data.clone()
    assert np.array_equal(np.asarray(run(reloaded), dtype=int), built)


@pytest.mark.parametrize("family", FLUX, ids=lambda family: family.name)
def test_flux_guidance_embedding(family: Family) -> None:
    pipe = built(family)
    default, strong = first_image(family), run(pipe, guidance_scale=8.0)  # the default is 3.5
    if family.name == "flux":
        assert pipe.transformer.config.guidance_embeds and not same(default, strong)
    else:  # schnell has no guidance embedding, and Flux pipelines run no classifier-free batch by default
        assert not pipe.transformer.config.guidance_embeds and same(default, strong)


def test_sd3_guidance_doubles_the_batch() -> None:
    pipe = built(FAMILIES[-1])
    batches: list[int] = []

    def spy(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        batches.append(kwargs["hidden_states"].shape[0])

    handle = pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run(pipe, guidance_scale=1.0)
        run(pipe, guidance_scale=5.0)
    finally:
        handle.remove()
    assert batches == [1] * STEPS + [2] * STEPS
