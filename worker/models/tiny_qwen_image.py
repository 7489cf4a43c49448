"""`tiny-qwen-image`: a Qwen-Image-shaped pipeline with random weights, built from configs.

Same component types and latent layout as Qwen-Image: a Qwen2.5-VL text encoder (its last hidden state is the
prompt) read through Qwen's chat template, a Wan-style 5-D VAE (16 channels, factor 8, per-channel latent mean and
std), a dual-stream MMDiT over latents packed in 2x2 patches to (B, seq, 64), and Qwen-Image's own shifted flow
schedule. A fixed seed and tiny sizes, so every code path of the real pipeline runs on a CPU in a fraction of a
second; the text encoder is put in eval mode (a config-built model trains, and dropout would make runs differ).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from worker.models.tiny_flux import in_eval_mode
from worker.models.tokenizer import _byte_symbols

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TEXT_WIDTH = 32  # the text encoder's hidden size: the transformer's joint attention width
LATENT_CHANNELS = 16
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen's ChatML turns: what the pipeline's prompt template spells out by hand."""


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer over the 256 byte symbols (no merges) and ChatML's special tokens, made in code:
    every prompt tokenizes, in any language, with no file or hub."""
    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    for token in (END_OF_TEXT, IM_START, IM_END):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(seed: int, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A two-layer Qwen2.5-VL (a one-block vision tower it never runs on text), multimodal RoPE as the real one's."""
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            # Qwen2.5-VL's sections split the head's rotary pairs over (time, height, width): 4 pairs of 8 dims.
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "bos_token_id": tokenizer.convert_tokens_to_ids(END_OF_TEXT),
            "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
            "pad_token_id": tokenizer.convert_tokens_to_ids(END_OF_TEXT),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
        # Token ids past the vocabulary: the tiny tokenizer has no vision tokens, and text never holds them.
        vision_start_token_id=vocab + 1,
        image_token_id=vocab + 2,
        video_token_id=vocab + 3,
        vision_end_token_id=vocab + 4,
    )
    torch.manual_seed(seed)
    return in_eval_mode(Qwen2_5_VLForConditionalGeneration(config))


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's schedule: resolution-dependent exponential shift, and a terminal sigma of 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def build(seed: int = 0) -> QwenImagePipeline:
    tokenizer = tiny_qwen2_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latent patches
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    torch.manual_seed(seed)
    # The default per-channel latents_mean/latents_std are Qwen-Image's own.
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return QwenImagePipeline(
        scheduler=qwen_scheduler(),
        vae=in_eval_mode(vae),
        text_encoder=tiny_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        transformer=in_eval_mode(transformer),
    )
