"""`tiny-flux2` and `tiny-flux2-distilled`: Flux.2 [klein]-shaped pipelines with random weights, built from configs.

Same component types and latent layout as Flux.2 klein (`Flux2KleinPipeline`): a 32-channel VAE with factor 8
whose latents are patchified 2x2 to 128 channels and normalised by its BatchNorm running statistics, a Qwen3
causal LM whose hidden states at layers 9, 18 and 27 are stacked into the prompt embeddings, and a Flux.2
transformer. The text encoder really has 27 layers (each 8 wide), so the pipeline's fixed
`text_encoder_out_layers` read it as they read the real one and no argument differs between tiny and real models.
`build` is klein base (true CFG: a second, negative transformer pass every step), `build_distilled` the
step-distilled klein (one pass, guidance ignored).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from worker.models.tiny_flux import in_eval_mode
from worker.models.tokenizer import _byte_symbols

LATENT_CHANNELS = 32
TEXT_WIDTH = 8
TEXT_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27
END = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Qwen3's chat template reduced to what the pipeline asks of it: user turns, a generation prompt, and the empty
# thinking block `enable_thinking=False` adds.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer over the 256 byte symbols (no merges) and the chat's special tokens."""
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for token in (END, IM_START, IM_END):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(seed: int, vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=16,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=1024,
    )
    return in_eval_mode(Qwen3ForCausalLM(config))


def tiny_vae(seed: int) -> AutoencoderKLFlux2:
    """Flux.2's VAE layout (32 channels, factor 8, 2x2 patches in a BatchNorm) with made-up running statistics, so
    that the pipeline's normalisation is no identity and a preview or decode that skipped it would be wrong."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        layers_per_block=1,
        mid_block_add_attention=False,
        sample_size=64,
    )
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
    vae.bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return in_eval_mode(vae)


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux.2's schedule: the pipeline passes its own sigmas and an empirical `mu` for the dynamic shift."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def _build(seed: int, is_distilled: bool) -> Flux2KleinPipeline:
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 patchified latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three hidden-state layers side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        guidance_embeds=False,  # klein has no guidance embedding
    )
    return Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_vae(seed),
        text_encoder=tiny_qwen3(seed, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=in_eval_mode(transformer),
        is_distilled=is_distilled,
    )


def build(seed: int = 0) -> Flux2KleinPipeline:
    """Flux.2 klein base-shaped: true CFG against an empty prompt, `guidance_scale` read every step."""
    return _build(seed, is_distilled=False)


def build_distilled(seed: int = 0) -> Flux2KleinPipeline:
    """Flux.2 klein distilled-shaped: one transformer pass per step, `guidance_scale` ignored."""
    return _build(seed, is_distilled=True)
