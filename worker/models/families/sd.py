"""Stable Diffusion 1.5 and SDXL: UNet families with CFG as one doubled batch (`[uncond, cond]`).

What is theirs: the pipeline classes, the cutoff callbacks that trim the doubled batch (`guidance`), the
A1111 sampler table (`worker.models.sampling`), clip skip, the linear preview factors, and a shared call that can
drop a job's rows mid-loop (every per-row tensor of the loop is a callback tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

import safetensors
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils.logging import disable_progress_bar
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers.initialization import no_init_weights

from producer.errors import ModelError, UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec
from worker.models import sampling, single_file, tiny_sd15, tiny_sdxl
from worker.models.families.base import Kind, ModelFamily, ModelOff
from worker.models.families.guidance import (
    CUTOFF_EXTRA,
    BatchSafeSDCFGCutoffCallback,
    BatchSafeSDXLCFGCutoffCallback,
    cutoff_callback,
)
from worker.models.prompt_embeds import Encoded, chunks, encode_chunks, pad_to, seen

# SDXL's factors are the ones in diffusers' callback guide ("Display image after each generation step"); SD 1.5's
# are the widely used least-squares fit of its latent space (in [-1, 1], scaled here to 0..255 the same way).
_SDXL_FACTORS = (((60, -60, 25, -70), (60, -5, 15, -50), (60, 10, -5, -35)), (150, 140, 130))
_SD15_UNIT = ((0.298, 0.187, -0.158, -0.184), (0.207, 0.286, 0.189, -0.271), (0.208, 0.173, 0.264, -0.473))
_SD15_FACTORS = (tuple(tuple(127.5 * w for w in row) for row in _SD15_UNIT), (127.5, 127.5, 127.5))


@cache
def _factors(family: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    weights, bias = _SDXL_FACTORS if family == "sdxl" else _SD15_FACTORS
    return (
        torch.tensor(weights, dtype=torch.float32, device=device),  # (3, 4)
        torch.tensor(bias, dtype=torch.float32, device=device),
    )


def linear_preview(latents: torch.Tensor, family: str) -> torch.Tensor:
    """(n, 4, h, w) latents -> (n, h, w, 3) uint8 on the latents' device, by the family's fixed factors."""
    w, b = _factors(family, latents.device)
    rgb = torch.einsum("nlhw,rl->nhwr", latents.float(), w) + b
    return rgb.clamp(0, 255).to(torch.uint8)


OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP-G text encoder in an original-layout file


class StableDiffusionFamily(ModelFamily):
    """What SD 1.5 and SDXL share."""

    cutoff_class: ClassVar[Any]
    ip_adapter = True
    clip_skip = True
    controlnet_class = ControlNetModel
    prompt_encoding = True
    guidance_curve = None  # CFG in one doubled batch, `guidance_scale` read at every step
    latent_hires = True  # 4-channel latents, which their img2img pipelines take as `image`

    def tiny_controlnet(self, base: Any, seed: int = 0) -> Any:
        # From a freshly built UNet, equal to the base's as built: the base's may hold LoRA layers by now, whose
        # weight names `from_unet` cannot load.
        unet = self.tiny["tiny"]().unet
        torch.manual_seed(seed)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))

    def check_sampler(self, name: str, model: str) -> None:
        if name != "default" and name not in sampling.SAMPLERS:
            names = ", ".join(sampling.SAMPLERS)
            raise UnsupportedSpecError(
                f"scheduler: {model!r} ({self.name}) takes one of: default, {names}; got {name!r}"
            )

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        return cutoff_callback(
            self.cutoff_class, spec, [*CUTOFF_EXTRA[kind], *(["image_embeds"] if ip_adapter else [])]
        )

    def preview(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        return linear_preview(latents, self.name)

    def decode(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        vae = pipe.vae
        upcast = (
            vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and hasattr(pipe, "upcast_vae")
        )
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        with torch.inference_mode():
            if mean is not None and std is not None and hasattr(pipe, "watermark"):
                shape = (1, latents.shape[1], 1, 1)
                mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
                std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
                latents = latents * std_t / vae.config.scaling_factor + mean_t
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            denormalize = [True] * image.shape[0]
            if hasattr(pipe, "run_safety_checker"):
                image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
                denormalize = denormalize if nsfw is None else [not flagged for flagged in nsfw]
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
            pixels: torch.Tensor = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=denormalize)
            return pixels.cpu()

    def batchable(self, pipe: Any) -> bool:
        # Not a guidance-embedding (LCM-distilled) UNet, whose per-row guidance embedding is computed once before
        # the loop.
        return getattr(pipe.unet.config, "time_cond_proj_dim", None) is None

    def can_drop_rows(self, pipe: Any) -> bool:
        return True

    def make_scheduler(self, name: str, checkpoint_scheduler: Any) -> tuple[Any, Any]:
        return sampling.make_scheduler(name, checkpoint_scheduler)

    def clip_skip_arguments(self, pipe: Any, spec: Any, prompt: str | list[str] | None = None) -> dict[str, Any]:
        return sampling.clip_skip_arguments(pipe, spec, prompt)

    def check_loaded(self, pipe: Any, spec: Any) -> None:
        sampling.check_clip_skip(pipe, spec)

    def model_off(self, pipe: Any) -> ModelOff:
        channels = int(pipe.unet.config.out_channels)
        return ModelOff(
            pipe.unet,
            lambda sample: sample.new_zeros((sample.shape[0], channels, *sample.shape[2:])),
            UNet2DConditionOutput,
        )

    def conditioning_arguments(self, positive: Encoded, negative: Encoded) -> dict[str, Any]:
        positive, negative = _same_length(positive, negative)
        arguments: dict[str, Any] = {"prompt": None, "negative_prompt": None}
        arguments |= {"prompt_embeds": positive.embeds, "negative_prompt_embeds": negative.embeds}
        if positive.pooled is not None:
            arguments |= {"pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled}
        return arguments

    def loop_conditioning(self, positive: Encoded, negative: Encoded, images: int, guided: bool) -> dict[str, Any]:
        positive, negative = _same_length(positive, negative)

        def rows(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            repeat = (images,) + (1,) * (pos.ndim - 1)
            return torch.cat([neg.repeat(repeat), pos.repeat(repeat)]) if guided else pos.repeat(repeat)

        tensors = {"prompt_embeds": rows(positive.embeds, negative.embeds)}
        if positive.pooled is not None and negative.pooled is not None:
            tensors["add_text_embeds"] = rows(positive.pooled, negative.pooled)
        return tensors


def _same_length(positive: Encoded, negative: Encoded) -> tuple[Encoded, Encoded]:
    """The prompt and its negative padded to one length with the empty prompt's chunk (A1111's rule); the filler
    is the negative's own last chunk where it is padding of zeros (SDXL's empty negative)."""
    longest = max(positive.embeds.shape[1], negative.embeds.shape[1])
    return (
        Encoded(pad_to(positive.embeds, longest, positive.filler), positive.pooled, positive.tokens, positive.filler),
        Encoded(pad_to(negative.embeds, longest, negative.filler), negative.pooled, negative.tokens, negative.filler),
    )


def refiner_source(source: str) -> bool:
    """Whether an SDXL model source is a refiner: the built-in `tiny-refiner`, or a directory (or cached hub id)
    whose `model_index.json` names `StableDiffusionXLImg2ImgPipeline`."""
    if source == "tiny-refiner":
        return True
    if source.startswith("tiny"):
        return False
    try:
        config = DiffusionPipeline.load_config(source, local_files_only=True)
    except (OSError, ValueError):
        return False
    return bool(config.get("_class_name") == StableDiffusionXLImg2ImgPipeline.__name__)


class SD15Family(StableDiffusionFamily):
    name = "sd15"
    pipelines = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
        "controlnet": StableDiffusionControlNetPipeline,
    }
    tiny = {"tiny": tiny_sd15.build}
    load_options = {"safety_checker": None, "requires_safety_checker": False}
    cutoff_class = BatchSafeSDCFGCutoffCallback
    prompt_schedule_inputs = ("prompt_embeds",)

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        encoder = pipe.text_encoder
        skip = spec.clip_skip

        def hidden(output: Any) -> torch.Tensor:
            # diffusers' rule: the last layer (with its final norm) or, skipping, an earlier one put through the norm
            if not skip:
                last: torch.Tensor = output[0]
                return last
            norm = getattr(encoder, "text_model", encoder).final_layer_norm
            skipped: torch.Tensor = norm(output.hidden_states[-(skip + 1)])
            return skipped

        parts = chunks(pipe.tokenizer, prompt)
        embeds, _ = encode_chunks(encoder, parts, hidden)
        filler, _ = encode_chunks(encoder, chunks(pipe.tokenizer, Weighted(())), hidden)
        return Encoded(embeds, None, {"text_encoder": seen(parts)}, filler)

    def batch_tensor_inputs(self, pipe: Any) -> list[str]:
        return ["latents", "prompt_embeds"]

    def drop_rows(self, callback_kwargs: dict[str, Any], index: torch.Tensor, guided: torch.Tensor) -> None:
        callback_kwargs["latents"] = callback_kwargs["latents"][index]
        callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"][guided]


class SDXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipelines = {
        "text2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
        "controlnet": StableDiffusionXLControlNetPipeline,
    }
    tiny = {"tiny": tiny_sdxl.build, "tiny-refiner": tiny_sdxl.build_refiner}
    cutoff_class = BatchSafeSDXLCFGCutoffCallback
    prompt_schedule_inputs = ("prompt_embeds", "add_text_embeds")
    refiner = True

    def load(self, source: str, dtype: torch.dtype) -> Any:
        # A refiner's directory names the img2img pipeline: `StableDiffusionXLPipeline` would load it without its
        # aesthetic-score setting and with no first text encoder to encode with.
        if refiner_source(source):
            disable_progress_bar()
            try:
                return StableDiffusionXLImg2ImgPipeline.from_pretrained(source, dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelError(f"could not load the SDXL refiner from {source!r}: {exc}") from exc
        return super().load(source, dtype)

    def variant(self, base: Any, kind: Kind, extra: Mapping[str, Any]) -> Any:
        if isinstance(base, StableDiffusionXLImg2ImgPipeline):  # a refiner: its own pipeline is its img2img one
            if kind != "img2img":
                raise UnsupportedSpecError(f"pipeline: an SDXL refiner runs img2img only; got {kind!r}")
            return base
        return super().variant(base, kind, extra)

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Weighted, *, negative: bool = False) -> Encoded:
        pairs = [
            (name, tokenizer, encoder)
            for name, tokenizer, encoder in (
                ("text_encoder", pipe.tokenizer, pipe.text_encoder),
                ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2),
            )
            if encoder is not None
        ]
        layer = -(spec.clip_skip + 2)  # diffusers' SDXL rule: the penultimate layer, `clip_skip` more back

        def hidden(output: Any) -> torch.Tensor:
            embeds: torch.Tensor = output.hidden_states[layer]
            return embeds

        def encode(text: Weighted) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, int]]:
            widths, pooled, tokens = [], None, {}
            for name, tokenizer, encoder in pairs:
                parts = chunks(tokenizer, text)
                embeds, pooled = encode_chunks(encoder, parts, hidden, pooled=True)
                widths.append(embeds)
                tokens[name] = seen(parts)
            longest = max(each.shape[1] for each in widths)
            # One BPE for both encoders gives both as many chunks; pad with zeros all the same if not.
            widths = [torch.nn.functional.pad(each, (0, 0, 0, longest - each.shape[1])) for each in widths]
            return torch.cat(widths, dim=-1), pooled, tokens

        if negative and not prompt.pieces and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            embeds, pooled, tokens = encode(prompt)  # diffusers' rule: an empty negative prompt is zeros
            zeros = torch.zeros_like(embeds)
            return Encoded(zeros, torch.zeros_like(pooled) if pooled is not None else None, tokens, zeros)
        embeds, pooled, tokens = encode(prompt)
        filler = embeds if not prompt.pieces else encode(Weighted(()))[0]
        return Encoded(embeds, pooled, tokens, filler)

    def whole_file_parts(self, facts: single_file.FileFacts, base: str, dtype: torch.dtype) -> dict[str, Any]:
        # diffusers tells an SDXL file's two text encoders apart by their width; where both are as wide (a small
        # or distilled model) it reads the OpenCLIP encoder from the CLIP-L keys and leaves its projection empty,
        # without a word. Read embedder 1 by its own prefix, as diffusers' conversion does for a full-size file.
        if not any(key.startswith(OPEN_CLIP_PREFIX) for key in facts.keys):
            return {}
        # From its config alone: `base` need hold no weights when the file holds them all.
        config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder_2", local_files_only=True)
        with no_init_weights():  # every weight is overwritten below: skip initialising 700M of them at random
            encoder = CLIPTextModelWithProjection(config)
        with safetensors.safe_open(facts.path, framework="pt") as handle:
            weights = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(OPEN_CLIP_PREFIX)}
        converted = convert_open_clip_checkpoint(encoder, weights, prefix=OPEN_CLIP_PREFIX)
        encoder.load_state_dict({key: value.to(dtype) for key, value in converted.items()}, strict=True)
        torch.nn.Module.to(encoder, dtype)  # transformers types its own `to` for devices only
        encoder.train(False)  # no dropout: what `eval()` does
        return {"text_encoder_2": encoder}

    def batch_tensor_inputs(self, pipe: Any) -> list[str]:
        return ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def drop_rows(self, callback_kwargs: dict[str, Any], index: torch.Tensor, guided: torch.Tensor) -> None:
        callback_kwargs["latents"] = callback_kwargs["latents"][index]
        callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"][guided]
        callback_kwargs["add_text_embeds"] = callback_kwargs["add_text_embeds"][guided]
        # Every row's time ids are equal (no negative size conditioning is passed): keep as many as rows.
        callback_kwargs["add_time_ids"] = callback_kwargs["add_time_ids"][: guided.shape[0]]
