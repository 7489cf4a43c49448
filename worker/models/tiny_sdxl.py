"""`tiny-sdxl`: a Stable Diffusion XL-shaped pipeline with random weights, built from configs.

Two text encoders (the second with a projection, as SDXL's), the `text_time` added
conditioning, SDXL's VAE scaling factor; tiny sizes and a fixed seed, like diffusers' own tests.

`tiny-sdxl-refiner` (`build_refiner`) is shaped like SDXL's refiner: the second text encoder alone, aesthetic-score
time ids, and the same VAE (one latent space with the base, so the base's latents hand over as they are).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.models.tiny_sd15 import SEED, euler_scheduler, tiny_text_config, tiny_vae
from worker.models.tokenizer import BOS, EOS, tiny_clip_tokenizer

TIME_EMBED_DIM = 8
PROJECTION_DIM = 32


def _unet(time_ids: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """SDXL's UNet, tiny: `time_ids` size/crop (and aesthetic score) numbers, each embedded in TIME_EMBED_DIM, plus
    the pooled text embedding condition it; its cross-attention reads `cross_attention_dim`-wide text states."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + PROJECTION_DIM,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
    )


def _tokenizer_and_text_config() -> tuple[CLIPTokenizer, CLIPTextConfig]:
    """A tiny CLIP tokenizer and the config of a text encoder for its vocabulary (both SDXL pipelines' encoders)."""
    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    return tokenizer, tiny_text_config(len(vocab), vocab[BOS], vocab[EOS], projection_dim=PROJECTION_DIM)


def build() -> StableDiffusionXLPipeline:
    tokenizer, config = _tokenizer_and_text_config()
    torch.manual_seed(SEED)
    # six size/crop numbers, each embedded, plus the pooled text embedding; both encoders' hidden states, concatenated
    unet = _unet(time_ids=6, cross_attention_dim=64)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=euler_scheduler(),
        add_watermarker=False,
    )


def build_refiner() -> StableDiffusionXLImg2ImgPipeline:
    tokenizer, config = _tokenizer_and_text_config()
    torch.manual_seed(SEED + 2)
    # five numbers (original size, crop, aesthetic score), each embedded, plus the pooled text embedding; the second
    # encoder's hidden states alone
    unet = _unet(time_ids=5, cross_attention_dim=config.hidden_size)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=euler_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
