"""`tiny-sd3`: a Stable Diffusion 3.5-shaped pipeline with random weights, built from configs.

Same component types and latent layout as SD 3.5 (16 VAE channels, VAE factor 8, an MMDiT with
2x2 patches, RMS-normed queries and keys, and a dual-attention block as in 3.5 Medium; two CLIP
encoders with projections and a T5 encoder), a fixed seed and tiny sizes, so every code path of the
real pipeline runs on a CPU in a fraction of a second.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from worker.models.t5_tokenizer import tiny_t5_tokenizer
from worker.models.tiny_flux import LATENT_CHANNELS, in_eval_mode, tiny_dit_vae, tiny_t5_encoder
from worker.models.tiny_sd15 import tiny_text_config
from worker.models.tokenizer import BOS, EOS, tiny_clip_tokenizer

CLIP_WIDTH = 32  # tiny_text_config's hidden size, for both CLIP encoders
PROJECTION_DIM = 32
# SD3 pads the two CLIP encoders' hidden states, side by side, to the T5 width and joins the sequences
T5_WIDTH = 2 * CLIP_WIDTH
HEADS, HEAD_DIM = 4, 8


def build(seed: int = 0) -> StableDiffusion3Pipeline:
    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    config = tiny_text_config(len(vocab), vocab[BOS], vocab[EOS], projection_dim=PROJECTION_DIM)
    tokenizer_3 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # latent pixels: a 64 px default image
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=2 * PROJECTION_DIM,  # both CLIP encoders' pooled projections, concatenated
        pos_embed_max_size=96,  # SD3's: up to 96 patches a side, 1536 px images
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return StableDiffusion3Pipeline(
        transformer=in_eval_mode(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_dit_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=in_eval_mode(text_encoder),
        tokenizer=tokenizer,
        text_encoder_2=in_eval_mode(text_encoder_2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed, len(tokenizer_3), T5_WIDTH),
        tokenizer_3=tokenizer_3,
    )
