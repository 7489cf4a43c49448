"""`tiny-z-image` and `tiny-z-image-turbo`: Z-Image-shaped pipelines with random weights, built from configs.

Same component types and latent layout as Z-Image (Flux.1's 16-channel VAE, factor 8, latents (B, 16, H/8, W/8)
that the transformer patchifies itself; a Qwen3 text encoder whose second-to-last hidden states condition it, behind
a Qwen2 tokenizer and its chat template), a fixed seed and tiny sizes, so every code path of the real pipeline runs
on a CPU in a fraction of a second. `build` is the base model (used with CFG: a separate negative pass), and
`build_turbo` the distilled Turbo (used without CFG); the two differ in weights only, as the real ones do, so the
family tells them apart by the model's name (see `worker.models.families.z_image`).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetModel, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from worker.models.tiny_flux import LATENT_CHANNELS, in_eval_mode, tiny_dit_vae
from worker.models.tokenizer import _byte_symbols

TEXT_WIDTH = 32  # the Qwen3 encoder's hidden size: the caption features the transformer takes
DIM, HEADS = 32, 2  # the transformer's width and heads: 16 per head, split by `axes_dims` over (frame, h, w)
END, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MAX_LENGTH = 512  # the pipeline pads every prompt to `max_sequence_length` (512) and keeps the unmasked tokens

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen's ChatML, the part Z-Image's prompt encoding uses (one user message, then the assistant's turn)."""


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer over the 256 byte symbols (no merges) and Qwen's special tokens, made in code:
    every byte of any prompt maps to a token, and the chat template frames it as Qwen's does."""
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for token in (END, IM_START, IM_END):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LENGTH,
    )


def tiny_qwen3_encoder(seed: int, vocab_size: int) -> Qwen3Model:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,  # the pipeline reads hidden_states[-2]: the first layer's output
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=MAX_LENGTH,
    )
    return in_eval_mode(Qwen3Model(config))


def tiny_transformer(seed: int) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=DIM,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=HEADS,
        n_kv_heads=HEADS,
        cap_feat_dim=TEXT_WIDTH,
        axes_dims=[4, 6, 6],  # sums to the head width
        axes_lens=[MAX_LENGTH + 64, 64, 64],
    )
    # The pad tokens stand in for the padding of shorter sequences in a batch; diffusers has made them with
    # torch.empty (uninitialised memory: runs would differ) and with zeros (then they would be untested): drawn from
    # the seed here, like every other weight.
    with torch.no_grad():
        for pad in (transformer.x_pad_token, transformer.cap_pad_token):
            pad.copy_(torch.randn(pad.shape) * 0.02)
    return in_eval_mode(transformer)


def tiny_controlnet(seed: int = 0) -> ZImageControlNetModel:
    """A ControlNet (Union 2.0-shaped: its control latents are padded to 33 channels) for the tiny transformer's
    width: its control blocks only, since `ZImageControlNetPipeline` lends it the transformer's embedders and
    refiners (`from_transformer`) when it is built."""
    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(
        control_layers_places=[0],
        control_refiner_layers_places=[0],
        control_in_dim=2 * LATENT_CHANNELS + 1,
        add_control_noise_refiner="control_noise_refiner",
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        dim=DIM,
        n_refiner_layers=1,
        n_heads=HEADS,
        n_kv_heads=HEADS,
    )
    # Its zero-initialised projections (a fresh ControlNet changes nothing until trained) are drawn from the seed,
    # so the control image changes the tiny model's images and a test can see that it is used.
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.endswith(("before_proj.weight", "after_proj.weight")):
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
    return in_eval_mode(controlnet)


def z_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Z-Image's scheduler config: a fixed shift of 3 (the pipeline's `mu` is unused without dynamic shifting)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def _build(seed: int) -> ZImagePipeline:
    tokenizer = tiny_qwen2_tokenizer()
    return ZImagePipeline(
        scheduler=z_image_scheduler(),
        vae=tiny_dit_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),  # Flux.1's VAE, as Z-Image ships it
        text_encoder=tiny_qwen3_encoder(seed, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=tiny_transformer(seed),
    )


def build(seed: int = 0) -> ZImagePipeline:
    """Z-Image (base): guided with a negative pass while `guidance_scale` > 0."""
    return _build(seed)


def build_turbo(seed: int = 1) -> ZImagePipeline:
    """Z-Image-Turbo-shaped: the same architecture with other weights (the real Turbo is distilled to run unguided)."""
    return _build(seed)
