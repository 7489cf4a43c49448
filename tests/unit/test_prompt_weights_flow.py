"""`a1111` prompts on the flow families: weights (T5 encoders), long prompts, prompt editing and guidance curves,
through the real diffusers loops of the tiny models, and each refusal's message."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer import RenderSpec, UnsupportedSpecError
from worker.engine.rendering import render
from worker.models.families import family_named
from worker.models.families.flux2 import _positions as flux2_positions
from worker.models.families.qwen_image import _positions as qwen_positions
from worker.models.families.z_image import _positions as z_image_positions
from worker.models.registry import ModelRegistry
from worker.settings import default_models
from worker.storage import LocalStorage

T5 = {"tiny-sd3": "text_encoder_3", "tiny-flux": "text_encoder_2", "tiny-chroma": "text_encoder"}
LLM = {"tiny-qwen-image": qwen_positions, "tiny-z-image": z_image_positions, "tiny-flux2": flux2_positions}
MODELS = [*T5, *LLM]
LIMITS = {"tiny-qwen-image": 1024, "tiny-z-image": 512, "tiny-flux2": 512}
WORDS = "a lighthouse on a cliff at dusk with waves and gulls and a red boat and pine trees and clouds "


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    """Every tiny flow pipeline, built once for the module (one cache slot each: no rebuilds between tests)."""
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=8)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "out")


def make_spec(model: str, **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a red fox", "num_inference_steps": 4, "width": 64, "height": 64, "seed": 7}
    data["guidance_scale"] = 4.0
    return RenderSpec.parse({**data, **overrides})


def rendered(registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec) -> tuple[bytes, Any]:
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.status == "succeeded", manifest.error
    data = storage.get(manifest.images[0].removeprefix(storage.base_url + "/"))
    assert data is not None
    return Image.open(io.BytesIO(data)).tobytes(), manifest


def pixels(registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec) -> bytes:
    return rendered(registry, storage, spec)[0]


def refusal(registry: ModelRegistry, model: str, **overrides: Any) -> str:
    """The message the family gives the spec, before loading or, for what only the model tells, once loaded."""
    spec = make_spec(model, **overrides)
    family = family_named(default_models()[model].family)
    with pytest.raises(UnsupportedSpecError) as caught:
        family.check(spec, model)
        family.check_loaded(registry.pipeline(model), spec)
    return str(caught.value)


class TextSpy:
    """The text conditioning and guidance scale the transformer gets at every call."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.texts: list[Any] = []
        self.scales: list[float] = []
        self._handle = pipe.transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        assert text is not None, "the transformer was called without text conditioning"
        self.texts.append([each.clone() for each in text] if isinstance(text, list) else text.clone())
        self.scales.append(float(self.pipe.guidance_scale))

    def run(self, registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec) -> list[Any]:
        self.texts.clear()
        self.scales.clear()
        rendered(registry, storage, spec)
        return list(self.texts)

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def spy(registry: ModelRegistry) -> Iterator[Any]:
    made: list[TextSpy] = []

    def attach(model: str) -> TextSpy:
        made.append(TextSpy(registry.pipeline(model)))
        return made[-1]

    yield attach
    for each in made:
        each.close()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and torch.equal(a, b)


def guided(model: str) -> dict[str, Any]:
    """A negative prompt where the family takes one (Flux.1: with true CFG; Flux.2: none)."""
    if model == "tiny-flux2":
        return {}
    if model == "tiny-flux":
        return {"negative_prompt": "blurry", "true_cfg_scale": 3.0}
    return {"negative_prompt": "blurry"}


@pytest.mark.parametrize("model", MODELS)
def test_an_a1111_prompt_without_syntax_is_the_plain_prompt_byte_for_byte(
    registry: ModelRegistry, storage: LocalStorage, model: str
) -> None:
    """Each family's encoding of a plain prompt is diffusers' own (two images: the given embeddings' batch)."""
    spec = make_spec(model, num_images=2, **guided(model))
    plain = pixels(registry, storage, spec)
    assert pixels(registry, storage, spec.model_copy(update={"prompt_syntax": "a1111"})) == plain


@pytest.mark.parametrize("model", list(T5))
def test_a_weight_changes_the_pixels(registry: ModelRegistry, storage: LocalStorage, model: str) -> None:
    plain = pixels(registry, storage, make_spec(model, prompt="red fox", prompt_syntax="a1111"))
    weighted = pixels(registry, storage, make_spec(model, prompt="(red:1.5) fox", prompt_syntax="a1111"))
    assert weighted != plain


def long_text(characters: int) -> str:
    return (WORDS * (characters // len(WORDS) + 1))[:characters].strip()


@pytest.mark.parametrize(
    ("model", "characters"),
    # SD3 beyond diffusers' 256 T5 positions, Qwen beyond its 512 default; the tiny T5 and Qwen tokenizers take a
    # token per character (a word's first with its marker), the 512-limit LLM families within it.
    [("tiny-sd3", 400), ("tiny-flux", 400), ("tiny-chroma", 400), ("tiny-qwen-image", 800)]
    + [("tiny-z-image", 400), ("tiny-flux2", 400)],
)
def test_a_long_prompt_reaches_the_encoder_whole(
    registry: ModelRegistry, storage: LocalStorage, model: str, characters: int
) -> None:
    pipe = registry.pipeline(model)
    text = long_text(characters)
    if model in T5:
        tokenizer = pipe.tokenizer_3 if model == "tiny-sd3" else pipe.tokenizer_2 if model == "tiny-flux" else None
        tokens = len((tokenizer or pipe.tokenizer)(text, add_special_tokens=False)["input_ids"])
        encoder = T5[model]
    else:
        tokens, encoder = LLM[model](pipe, text), "text_encoder"
    assert tokens > (characters * 3) // 4
    spec = make_spec(model, prompt=text, prompt_syntax="a1111")
    whole, manifest = rendered(registry, storage, spec)
    assert manifest.prompt_tokens is not None and manifest.prompt_tokens[encoder] == tokens, manifest.prompt_tokens
    clip = {name: count for name, count in manifest.prompt_tokens.items() if name != encoder}
    assert set(clip.values()) <= {75}, "the CLIP encoders see the first 75 tokens"
    cut = pixels(registry, storage, make_spec(model, prompt=text[: characters // 2], prompt_syntax="a1111"))
    assert whole != cut


@pytest.mark.parametrize(
    "model",
    ["tiny-sd3", "tiny-flux", "tiny-chroma", "tiny-qwen-image", "tiny-z-image", "tiny-flux2"],
)
def test_prompt_editing_switches_the_conditioning_at_its_step(
    registry: ModelRegistry, storage: LocalStorage, spy: Any, model: str
) -> None:
    """`[cat:dog:2]` over 4 steps: the transformer's calls of steps 0-1 get `cat`'s text, of steps 2-3 `dog`'s
    (every call of a step: the negative pass sees the same negative in all three runs)."""
    watch = spy(model)
    extra = guided(model)
    cat = watch.run(registry, storage, make_spec(model, prompt="a photo of a cat", prompt_syntax="a1111", **extra))
    dog = watch.run(registry, storage, make_spec(model, prompt="a photo of a dog", prompt_syntax="a1111", **extra))
    edit = watch.run(
        registry, storage, make_spec(model, prompt="a photo of a [cat:dog:2]", prompt_syntax="a1111", **extra)
    )
    calls = len(edit) // 4
    assert len(edit) == len(cat) == 4 * calls
    for index, text in enumerate(edit):
        expected = cat if index // calls < 2 else dog
        assert same(text, expected[index]), f"call {index} (step {index // calls}): not the expected prompt's"
    assert not same(cat[0], dog[0]), "the two prompts condition alike: the test would see no switch"


@pytest.mark.parametrize(
    ("model", "curve", "seen"),
    [
        ("tiny-sd3", {"from": 9, "to": 3, "curve": "linear"}, [9, 7, 5, 3]),
        ("tiny-z-image", {"from": 2, "to": 0.5, "curve": "linear"}, [2, 1.5, 1, 0.5]),  # above 0 is guided here
    ],
)
def test_a_guidance_curve_sets_each_steps_scale(
    registry: ModelRegistry, storage: LocalStorage, spy: Any, model: str, curve: dict[str, Any], seen: list[float]
) -> None:
    watch = spy(model)
    watch.run(registry, storage, make_spec(model, guidance=curve))
    assert watch.scales == pytest.approx(seen)
    constant = pixels(registry, storage, make_spec(model, guidance_scale=seen[0]))
    assert pixels(registry, storage, make_spec(model, guidance=curve)) != constant


REFUSALS = [
    # weights and BREAK
    ("tiny-sd3", {"prompt": "a fox BREAK a hill"}, r"prompt: .* BREAK .* means nothing"),
    ("tiny-chroma", {"negative_prompt": "dark BREAK blurry"}, r"negative_prompt: .* BREAK"),
    ("tiny-qwen-image", {"prompt": "a (red:1.3) fox"}, r"prompt: .* no weights or BREAK: .*RMS-normalises"),
    ("tiny-z-image", {"prompt": "a fox BREAK a hill"}, r"prompt: .* no weights or BREAK: .*RMS-normalises"),
    ("tiny-flux2", {"prompt": "a [red] fox"}, r"prompt: .* no weights or BREAK: .*hidden layers of an LLM"),
    # the negative prompt's editing
    ("tiny-flux", {"negative_prompt": "[dark:blurry:2]", "true_cfg_scale": 2.0}, r"negative_prompt: .* true-CFG"),
    ("tiny-chroma", {"negative_prompt": "[dark:blurry:2]"}, r"negative_prompt: .* during the loop"),
    ("tiny-qwen-image", {"negative_prompt": "[dark:blurry:2]"}, r"negative_prompt: .* fixed before the loop"),
    ("tiny-z-image", {"negative_prompt": "[dark:blurry:2]"}, r"negative_prompt: .* negative_prompt_embeds"),
    # guidance curves
    ("tiny-flux", {"guidance": {"from": 4, "to": 2}}, r"guidance: .* guidance-distilled"),
    ("tiny-chroma", {"guidance": {"from": 4, "to": 2}}, r"guidance: .* read once before the loop"),
    ("tiny-qwen-image", {"guidance": {"from": 4, "to": 2}}, r"guidance: .* true_cfg_scale"),
    ("tiny-flux2", {"guidance": {"from": 4, "to": 2}}, r"guidance: .* read once before the loop"),
    ("tiny-z-image-turbo", {"guidance": {"from": 4, "to": 2}}, r"guidance: .* Z-Image-Turbo"),
    ("tiny-z-image", {"guidance": {"from": 4, "to": 0}}, r"guidance: every step's scale must be above 0"),
    ("tiny-sd3", {"guidance": {"from": 4, "to": 1}}, r"guidance: every step's scale must be above 1"),
    # beyond the encoders' limits (known once the tokenizer is loaded)
    ("tiny-sd3", {"prompt": long_text(800)}, r"prompt: \d+ T5 tokens .* \(511 and an end token"),
    (
        "tiny-flux",
        {"prompt": "a fox", "negative_prompt": long_text(800), "true_cfg_scale": 2.0},
        r"negative_prompt: .* T5",
    ),
    ("tiny-chroma", {"prompt": long_text(800)}, r"prompt: \d+ T5 tokens"),
    ("tiny-qwen-image", {"prompt": long_text(1100)}, r"prompt: \d+ positions .* keeps \(1024"),
    ("tiny-z-image", {"prompt": long_text(800)}, r"prompt: \d+ positions .* keeps \(512"),
    ("tiny-flux2", {"prompt": long_text(800)}, r"prompt: \d+ positions .* keeps \(512"),
]


@pytest.mark.parametrize(("model", "overrides", "message"), REFUSALS)
def test_what_a_family_cannot_follow_is_refused_by_name(
    registry: ModelRegistry, model: str, overrides: dict[str, Any], message: str
) -> None:
    found = refusal(registry, model, prompt_syntax="a1111", **overrides)
    assert re.search(message, found), found
