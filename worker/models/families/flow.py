"""What the flow-matching transformer families (Flux.1, SD3.5, ...) share: flow samplers, a transformer in the
loop, a preview fitted to each loaded model's own VAE, the VAE decode of rows that leave a shared call, and `a1111`
prompts on a T5 encoder (Flux.1, SD3, Chroma): the whole prompt as one weighted sequence of up to 512 positions
(`worker.models.prompt_embeds.encode_t5`), an error beyond them, and BREAK refused (it ends a 75-token CLIP chunk;
a T5 sequence has no chunks).

LLM-encoded families (Qwen-Image, Z-Image, Flux.2) take `a1111` prompts without weights (`refuse_weights`, each
family saying why) but with prompt editing, encoded by their pipelines' own encoders; `check_llm_positions` counts
what those encoders would see, so that a prompt beyond their limit is refused, never cut."""

from __future__ import annotations

import threading
import weakref
from typing import Any, ClassVar

import torch

from producer.errors import UnsupportedSpecError
from producer.prompt_syntax import Break
from producer.spec import RenderSpec
from worker.models import flow_sampling, preview_fit
from worker.models.families.base import ModelFamily, prompt_spans
from worker.models.prompt_embeds import T5_MOST, Encoded, t5_positions

_MAPS: weakref.WeakKeyDictionary[Any, preview_fit.LatentRgb] = weakref.WeakKeyDictionary()
_MAPS_LOCK = threading.Lock()


def fitted_map(pipe: Any, family: FlowFamily) -> preview_fit.LatentRgb:
    """The latent->RGB map of `pipe`'s VAE, fitted on first use (float32 latents, through the family's own decode,
    `vae_pixels`) and kept while the VAE is loaded: a fine-tune or a new family gets a preview calibrated to its own
    decoder, with no copied factors."""
    vae = pipe.vae
    with _MAPS_LOCK:
        found = _MAPS.get(vae)
        if found is None:

            def decode(latents: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return (family.vae_pixels(pipe, latents.float()).float() / 2 + 0.5).clamp(0, 1)

            found = _MAPS[vae] = preview_fit.fit(decode, family.latent_channels(pipe), size=16, samples=8)
        return found


class FlowFamily(ModelFamily):
    """A flow-matching transformer family."""

    denoiser = "transformer"
    cuda_dtype = "bfloat16"  # trained in bfloat16; float16 overflows in their activations (Flux's notably)
    stochastic: ClassVar[frozenset[str]] = frozenset({"flow_euler_sde", "lcm"})
    t5: ClassVar[tuple[str, str] | None] = None  # the pipeline's T5 (tokenizer, encoder) attributes, where it has one
    t5_length: ClassVar[int] = 512  # the pipeline's default `max_sequence_length`: a prompt that fits is padded to it
    # Why the negative prompt cannot change during the loop (None: the loop's callback tensors carry it).
    negative_schedule: ClassVar[str | None] = None

    def check_prompts(self, spec: RenderSpec, model: str) -> None:
        super().check_prompts(spec, model)
        if spec.prompt_syntax != "a1111" or not self.prompt_encoding:
            return
        for name, spans in prompt_spans(spec):
            if self.t5 is not None and any(isinstance(piece, Break) for _, prompt in spans for piece in prompt.pieces):
                raise UnsupportedSpecError(
                    f"{name}: {model!r} ({self.name}) reads the prompt as one T5 sequence, where BREAK (the end of a "
                    "75-token CLIP chunk) means nothing; remove BREAK"
                )
            if name == "negative_prompt" and len(spans) > 1 and self.negative_schedule is not None:
                raise UnsupportedSpecError(
                    f"negative_prompt: {model!r} ({self.name}) cannot change its negative prompt during the loop: "
                    f"{self.negative_schedule}; remove the prompt editing from negative_prompt"
                )

    def check_loaded(self, pipe: Any, spec: RenderSpec) -> None:
        super().check_loaded(pipe, spec)
        if spec.prompt_syntax == "a1111" and self.prompt_encoding and self.t5 is not None:
            self.t5_sequence_length(pipe, spec)

    def t5_sequence_length(self, pipe: Any, spec: RenderSpec) -> int:
        """The positions every T5 input of the spec is padded to: the pipeline's default where all its spans fit,
        else 512; a prompt beyond 512 is refused by name."""
        assert self.t5 is not None
        tokenizer = getattr(pipe, self.t5[0])
        longest = 0
        for name, spans in prompt_spans(spec):
            for _, prompt in spans:
                positions = t5_positions(tokenizer, prompt)
                if positions > T5_MOST:
                    raise UnsupportedSpecError(
                        f"{name}: {positions - 1} T5 tokens on {spec.model!r} ({self.name}), more than its encoder "
                        f"takes ({T5_MOST - 1} and an end token, diffusers' max_sequence_length); shorten it"
                    )
                longest = max(longest, positions)
        return self.t5_length if longest <= self.t5_length else T5_MOST

    def check_sampler(self, name: str, model: str) -> None:
        flow_sampling.check_flow_sampler(name, model)

    def make_scheduler(self, name: str, checkpoint_scheduler: Any) -> tuple[Any, Any]:
        return flow_sampling.make_flow_scheduler(name, checkpoint_scheduler)

    def before_call(self, spec: RenderSpec, seed: int) -> None:
        # The flow pipelines call `scheduler.step` without their generator, so a stochastic sampler draws its noise
        # from torch's global generator: seeded here, a seeded job renders the same image every time.
        if spec.scheduler in self.stochastic:
            torch.manual_seed(seed)

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The loop's latents as (n, C, h, w) VAE latents (before the pipeline's scaling and shift)."""
        return latents

    def latent_channels(self, pipe: Any) -> int:
        """The channels of the VAE latents `unpacked` gives."""
        return int(pipe.vae.config.latent_channels)

    def vae_pixels(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) VAE latents as the loop has them -> the VAE's decode, (n, 3, H, W) in [-1, 1]: the pipeline's
        own steps before `vae.decode` undone first (here its scaling and shift). The decode of rows leaving a shared
        call and the fit of the preview map both go through it."""
        vae = pipe.vae
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image: torch.Tensor = vae.decode(z, return_dict=False)[0]
        return image

    def preview(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        return fitted_map(pipe, self).apply(self.unpacked(pipe, latents, height, width))

    def decode(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        with torch.inference_mode():
            image = self.vae_pixels(pipe, self.unpacked(pipe, latents, height, width))
            pixels: torch.Tensor = pipe.image_processor.postprocess(image, output_type="pt")
            return pixels.cpu()

    def batchable(self, pipe: Any) -> bool:
        return True


def check_llm_positions(spec: RenderSpec, model: str, family: str, count: Any, most: int) -> None:
    """Refuse an `a1111` prompt that an LLM encoder would cut: `count(text)` is the positions the pipeline's own
    encoder fills with it (chat template included), `most` what the pipeline keeps."""
    if spec.prompt_syntax != "a1111":
        return
    for name, spans in prompt_spans(spec):
        for _, prompt in spans:
            positions = count(prompt.text())
            if positions > most:
                raise UnsupportedSpecError(
                    f"{name}: {positions} positions on {model!r} ({family}) with its chat template, more than its "
                    f"text encoder keeps ({most}, the pipeline's max_sequence_length); shorten it"
                )


def refuse_weights(spec: RenderSpec, model: str, family: str, why: str) -> None:
    """Refuse weights and BREAK in an `a1111` prompt of a family whose encoder cannot take them (`why`)."""
    if spec.prompt_syntax != "a1111":
        return
    for name, spans in prompt_spans(spec):
        if any(not prompt.is_plain() for _, prompt in spans):
            raise UnsupportedSpecError(
                f"{name}: {model!r} ({family}) takes no weights or BREAK: {why}; remove them (prompt editing works) "
                "or send prompt_syntax 'plain'"
            )


SECOND_TENSOR = {"pooled": ("pooled_prompt_embeds", "pooled"), "mask": ("prompt_attention_mask", "mask")}
"""What goes with a T5 family's given embeddings: Flux's pooled CLIP vector, Chroma's attention mask."""


def given_embeddings(positive: Encoded, negative: Encoded, second: str) -> dict[str, Any]:
    """A T5 family's call arguments for encoded prompts: the embeddings and their `second` tensor (`SECOND_TENSOR`),
    one row per image (given embeddings are the call's whole batch), the negative's where it was encoded."""
    name, attribute = SECOND_TENSOR[second]
    images = positive.images
    extra = getattr(positive, attribute)
    assert extra is not None
    arguments: dict[str, Any] = {
        "prompt": None,
        "negative_prompt": None,
        "num_images_per_prompt": 1,
        "prompt_embeds": positive.embeds.repeat(images, 1, 1),
        name: extra.repeat(images, 1),
    }
    if (negative_extra := getattr(negative, attribute)) is not None:
        arguments["negative_prompt_embeds"] = negative.embeds.repeat(images, 1, 1)
        arguments[f"negative_{name}"] = negative_extra.repeat(images, 1)
    return arguments
