"""`tiny-chroma`: a Chroma-shaped pipeline with random weights, built from configs.

Same component types and latent layout as Chroma1 (Flux.1's 16-channel VAE, factor 8, latents packed in 2x2 patches
to 64 channels; a T5 encoder alone, no CLIP; a transformer whose modulation comes from a small "approximator"
network instead of a pooled prompt and a guidance embedding), a fixed seed and tiny sizes, so every code path of the
real pipeline, its separate negative pass included, runs on a CPU in a fraction of a second.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from worker.models.t5_tokenizer import tiny_t5_tokenizer
from worker.models.tiny_flux import LATENT_CHANNELS, flux_scheduler, in_eval_mode, tiny_dit_vae, tiny_t5_encoder

T5_WIDTH = 32
HEADS, HEAD_DIM = 2, 16


def _transformer() -> ChromaTransformer2DModel:
    with warnings.catch_warnings():  # diffusers' Chroma model uses a name diffusers deprecated, and says so
        warnings.filterwarnings("ignore", message="`FluxPosEmbed` is deprecated", category=FutureWarning)
        transformer = ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latent patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS,
            joint_attention_dim=T5_WIDTH,
            axes_dims_rope=(4, 6, 6),  # sums to the head width
            approximator_num_channels=16,  # 4 each for the timestep and the (unused) guidance, 8 for the layer index
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
    return in_eval_mode(transformer)


def build(seed: int = 0) -> ChromaPipeline:
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = _transformer()
    return ChromaPipeline(
        scheduler=flux_scheduler(),  # the loop shifts the schedule by the token count (`mu`), as Flux.1 [dev] does
        vae=tiny_dit_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),  # Flux's VAE, as Chroma ships it
        text_encoder=tiny_t5_encoder(seed, len(tokenizer), T5_WIDTH),
        tokenizer=tokenizer,
        transformer=transformer,
    )
