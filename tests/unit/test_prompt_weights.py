"""`a1111` prompts on SD 1.5 and SDXL: weights, long prompts, BREAK, prompt editing and guidance curves, through
the real diffusers loop of the tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from producer import RenderSpec, UnsupportedSpecError
from producer.prompt_syntax import Piece, Weighted
from worker.engine.rendering import render
from worker.models.families import family_named
from worker.models.prompt_embeds import chunks
from worker.models.registry import ModelRegistry
from worker.storage import LocalStorage

MODELS = ["tiny-sd15", "tiny-sdxl"]
WORDS = "a lighthouse on a cliff at dusk with waves and gulls and a red boat and pine trees and clouds".split()


def make_spec(model: str, **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a red fox", "num_inference_steps": 6, "width": 64, "height": 64, "seed": 7}
    return RenderSpec.parse({**data, **overrides})


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "out")


def image_bytes(registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec) -> bytes:
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.status == "succeeded", manifest.error
    data = storage.get(manifest.images[0].removeprefix(storage.base_url + "/"))
    assert data is not None
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).tobytes()


class Calls:
    """The UNet's input latents and text conditioning at every call."""

    def __init__(self, pipe: Any) -> None:
        self.samples: list[torch.Tensor] = []
        self.conditioning: list[torch.Tensor] = []
        self._handle = pipe.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.samples.append((args[0] if args else kwargs["sample"]).clone())
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        assert hidden is not None, "the UNet was called without text conditioning"
        self.conditioning.append(hidden.clone())

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def calls(registry: ModelRegistry) -> Iterator[Any]:
    made: list[Calls] = []

    def attach(model: str) -> Calls:
        made.append(Calls(registry.pipeline(model)))
        return made[-1]

    yield attach
    for each in made:
        each.close()


@pytest.mark.parametrize("model", MODELS)
def test_a_weight_changes_the_pixels(registry: ModelRegistry, storage: LocalStorage, model: str) -> None:
    plain = image_bytes(registry, storage, make_spec(model, prompt="red fox", prompt_syntax="a1111"))
    weighted = image_bytes(registry, storage, make_spec(model, prompt="(red:1.5) fox", prompt_syntax="a1111"))
    assert weighted != plain


@pytest.mark.parametrize("model", MODELS)
def test_an_a1111_prompt_without_syntax_is_the_plain_prompt_byte_for_byte(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    """The encoder reproduces diffusers' own: same ids, padding, hidden layer (and SDXL's zeros for no negative)."""
    for negative in ("", "blurry, dark"):
        plain = image_bytes(registry, storage, make_spec(model, negative_prompt=negative))
        a1111 = image_bytes(registry, storage, make_spec(model, negative_prompt=negative, prompt_syntax="a1111"))
        assert a1111 == plain, f"negative {negative!r}"


def test_clip_skip_in_a1111_skips_in_the_prompt_as_diffusers_and_in_the_negative_as_a1111(
    registry: ModelRegistry, storage: LocalStorage
) -> None:
    """diffusers skips layers in the prompt only; A1111 in its negative too, which `a1111` follows."""
    for model in MODELS:
        unguided = {"clip_skip": 1, "guidance_scale": 1.0}  # no negative pass: the prompt's embeddings alone
        plain = image_bytes(registry, storage, make_spec(model, **unguided))
        a1111 = image_bytes(registry, storage, make_spec(model, **unguided, prompt_syntax="a1111"))
        assert a1111 == plain, model
        guided = {"clip_skip": 1, "negative_prompt": "blurry"}
        plain = image_bytes(registry, storage, make_spec(model, **guided))
        a1111 = image_bytes(registry, storage, make_spec(model, **guided, prompt_syntax="a1111"))
        assert a1111 != plain, model


@pytest.mark.parametrize("model", MODELS)
def test_a_long_prompt_reaches_the_encoder_whole(registry: ModelRegistry, storage: LocalStorage, model: str) -> None:
    pipe = registry.pipeline(model)
    words = (WORDS * 20)[:200]
    text = " ".join(words)
    tokens = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokens > 150
    spec = make_spec(model, prompt=text, prompt_syntax="a1111")
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.prompt_tokens is not None
    assert set(manifest.prompt_tokens.values()) == {tokens}, manifest.prompt_tokens
    # The first 75 of its tokens alone (what a CLIP encoder keeps of a plain prompt) give other pixels.
    first = pipe.tokenizer.decode(pipe.tokenizer(text, add_special_tokens=False)["input_ids"][:75])
    long_pixels = image_bytes(registry, storage, spec)
    cut_pixels = image_bytes(registry, storage, make_spec(model, prompt=first, prompt_syntax="a1111"))
    assert long_pixels != cut_pixels


def test_chunks_follow_a1111(registry: ModelRegistry) -> None:
    tokenizer = registry.pipeline("tiny-sd15").tokenizer
    words = " ".join(WORDS * 10)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    parts = chunks(tokenizer, Weighted((Piece(words, 1.0),)))
    assert [p.tokens for p in parts] == [75] * (len(ids) // 75) + ([len(ids) % 75] if len(ids) % 75 else [])
    assert all(len(p.ids) == 77 and p.ids[0] == tokenizer.bos_token_id for p in parts)
    assert sum((p.ids[1 : 1 + p.tokens] for p in parts), []) == ids
    from producer.prompt_syntax import Break

    broken = chunks(tokenizer, Weighted((Piece("a red fox", 1.0), Break(), Piece("a blue sky", 1.3))))
    assert len(broken) == 2
    assert broken[1].weights[1 : 1 + broken[1].tokens] == [1.3] * broken[1].tokens


@pytest.mark.parametrize("model", MODELS)
def test_prompt_editing_follows_one_prompt_then_the_other(
    registry: ModelRegistry, storage: LocalStorage, calls: Any, model: str
) -> None:
    """`[cat:dog:0.5]` over 6 steps: steps 0-2 see `cat`'s conditioning and take `cat`'s latents; from step 3 on,
    `dog`'s conditioning."""
    spy = calls(model)

    def run(prompt: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        spy.samples.clear()
        spy.conditioning.clear()
        render(make_spec(model, prompt=prompt, prompt_syntax="a1111"), registry=registry, storage=storage)
        return list(spy.samples), list(spy.conditioning)

    cat_samples, cat_cond = run("a photo of a cat")
    dog_samples, dog_cond = run("a photo of a dog")
    edit_samples, edit_cond = run("a photo of a [cat:dog:0.5]")
    switch = 3
    assert len(edit_samples) == 6
    for step in range(6):
        expected = cat_cond if step < switch else dog_cond
        assert torch.equal(edit_cond[step], expected[step]), f"step {step}: not the expected prompt's embeddings"
    for step in range(switch + 1):  # the input of step `switch` is the output of the last `cat` step
        assert torch.equal(edit_samples[step], cat_samples[step]), f"step {step}: latents left cat's"
    assert not torch.equal(edit_samples[switch + 1], cat_samples[switch + 1])
    assert not torch.equal(edit_samples[switch + 1], dog_samples[switch + 1])


@pytest.mark.parametrize("model", MODELS)
def test_prompt_editing_with_two_images_and_a_cfg_cutoff(
    registry: ModelRegistry, storage: LocalStorage, calls: Any, model: str
) -> None:
    """A switch after the cutoff hands over the conditional rows only, for every image."""
    spy = calls(model)
    spec = make_spec(
        model,
        prompt="a [cat:dog:4] in the snow",
        negative_prompt="blurry",
        prompt_syntax="a1111",
        num_images=2,
        callbacks=[{"type": "cfg_cutoff", "step_index": 1}],
    )
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.status == "succeeded", manifest.error
    assert [c.shape[0] for c in spy.conditioning] == [4, 4, 2, 2, 2, 2]
    assert torch.equal(spy.conditioning[4][0], spy.conditioning[4][1])
    assert not torch.equal(spy.conditioning[3], spy.conditioning[4])


@pytest.mark.parametrize("model", MODELS)
def test_a_guidance_curve_sets_each_steps_scale(registry: ModelRegistry, storage: LocalStorage, model: str) -> None:
    pipe = registry.pipeline(model)
    seen: list[float] = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(float(pipe.guidance_scale)))
    try:
        spec = make_spec(model, guidance={"from": 9, "to": 4, "curve": "linear"})
        manifest = render(spec, registry=registry, storage=storage)
    finally:
        handle.remove()
    assert manifest.status == "succeeded", manifest.error
    assert seen == pytest.approx([9, 8, 7, 6, 5, 4])
    plain = image_bytes(registry, storage, make_spec(model, guidance_scale=9))
    assert image_bytes(registry, storage, spec) != plain


def test_a_guidance_curve_ends_at_a_cutoff(registry: ModelRegistry, storage: LocalStorage) -> None:
    pipe = registry.pipeline("tiny-sd15")
    seen: list[float] = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(float(pipe.guidance_scale)))
    try:
        spec = make_spec(
            "tiny-sd15",
            guidance=[[0, 9], [1, 4]],
            callbacks=[{"type": "cfg_cutoff", "step_index": 2}],
        )
        manifest = render(spec, registry=registry, storage=storage)
    finally:
        handle.remove()
    assert manifest.status == "succeeded", manifest.error
    assert seen == pytest.approx([9, 8, 7, 0, 0, 0])


def test_a_guidance_curve_at_or_below_one_is_refused() -> None:
    family = family_named("sd15")
    with pytest.raises(UnsupportedSpecError, match=r"guidance: every step's scale must be above 1"):
        family.check(make_spec("tiny-sd15", guidance={"from": 7, "to": 1}), "tiny-sd15")


@pytest.mark.parametrize("model", MODELS)
def test_a_plain_prompt_cut_by_the_encoder_says_so_in_the_manifest(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    """`plain` keeps diffusers' 77-position cut (today's images), but the manifest tells what each encoder saw."""
    pipe = registry.pipeline(model)
    text = " ".join((WORDS * 20)[:200])
    tokens = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
    encoders = {"tiny-sd15": ["text_encoder"], "tiny-sdxl": ["text_encoder", "text_encoder_2"]}[model]
    cut = render(make_spec(model, prompt=text), registry=registry, storage=storage)
    assert cut.status == "succeeded" and cut.prompt_tokens == dict.fromkeys(encoders, 75)
    assert cut.warnings == [
        f"prompt: {name} saw 75 of its {tokens} tokens (a plain prompt is cut as diffusers cuts it); "
        'send "prompt_syntax": "a1111" for the whole prompt'
        for name in encoders
    ]
    short = render(make_spec(model, prompt="a red fox"), registry=registry, storage=storage)
    few = len(pipe.tokenizer("a red fox", add_special_tokens=False)["input_ids"])
    assert short.warnings == [] and short.prompt_tokens == dict.fromkeys(encoders, few)
