"""`tiny-flux` and `tiny-flux-schnell`: Flux.1-shaped pipelines with random weights, built from configs.

Same component types and latent layout as Flux.1 (16 VAE channels, VAE factor 8, latents packed in
2x2 patches to 64 channels; a CLIP encoder for the pooled prompt, a T5 encoder for the token sequence),
a fixed seed and tiny sizes, so every code path of the real pipeline runs on a CPU in a fraction of a
second. `build` is dev-shaped (a guidance embedding), `build_schnell` schnell-shaped (none).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from worker.models.t5_tokenizer import tiny_t5_tokenizer
from worker.models.tiny_sd15 import tiny_text_config
from worker.models.tokenizer import BOS, EOS, tiny_clip_tokenizer

CLIP_WIDTH = 32  # tiny_text_config's hidden size: the pooled prompt the transformer takes
T5_WIDTH = 32
LATENT_CHANNELS = 16

M = TypeVar("M", bound=torch.nn.Module)


def in_eval_mode(module: M) -> M:
    """`module` in eval mode, as `from_pretrained` gives it: a config-built module trains, and T5's dropout would
    make runs differ. (Through `torch.nn.Module.eval`, typed, where transformers' override is not.)"""
    torch.nn.Module.eval(module)
    return module


def tiny_dit_vae(seed: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 16-channel VAE laid out like Flux's and SD3's: factor 8, a latent shift, no quant convs."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return in_eval_mode(vae)


def tiny_t5_encoder(seed: int, vocab_size: int, width: int) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated GELU), like Flux's and SD3's T5-XXL."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
    )
    return in_eval_mode(T5EncoderModel(config))


def flux_scheduler(dynamic_shifting: bool = True, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        shift=shift,
        use_dynamic_shifting=dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _build(seed: int, guidance_embeds: bool, scheduler: FlowMatchEulerDiscreteScheduler) -> FluxPipeline:
    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latent patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(len(vocab), vocab[BOS], vocab[EOS]))
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_dit_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=in_eval_mode(text_encoder),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(seed, len(tokenizer_2), T5_WIDTH),
        tokenizer_2=tokenizer_2,
        transformer=in_eval_mode(transformer),
    )


def build(seed: int = 0) -> FluxPipeline:
    """Flux.1 [dev]-shaped: `guidance_scale` feeds the transformer's guidance embedding (no second batch)."""
    return _build(seed, guidance_embeds=True, scheduler=flux_scheduler())


def build_schnell(seed: int = 0) -> FluxPipeline:
    """Flux.1 [schnell]-shaped: no guidance embedding, and schnell's fixed (unshifted) schedule."""
    return _build(seed, guidance_embeds=False, scheduler=flux_scheduler(dynamic_shifting=False, shift=1.0))
