"""`tiny-sd15`: a Stable Diffusion 1.5-shaped pipeline with random weights, built from configs.

Same component types and latent layout as SD 1.5 (4 latent channels, VAE factor 8), a few
thousand parameters, a fixed seed: every code path of the real pipeline runs on a CPU in a
fraction of a second and gives the same bytes on every machine of one torch build.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from worker.models.tokenizer import BOS, EOS, MAX_LENGTH, tiny_clip_tokenizer

SEED = 0


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=scaling_factor,
    )


def tiny_text_config(vocab_size: int, bos_id: int, eos_id: int, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_LENGTH,
        vocab_size=vocab_size,
        projection_dim=projection_dim,
    )


def euler_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


def build() -> StableDiffusionPipeline:
    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(tiny_text_config(len(vocab), vocab[BOS], vocab[EOS]))
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=euler_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
