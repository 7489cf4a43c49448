"""IP-Adapter: a tiny offline one (image encoder + projection + attention weights), attached per job.

An IP-Adapter is loaded into the model's shared UNet for one job and unloaded after it, so the next
job, with or without one, runs on the plain UNet at the plain scale. This is the per-job reset that
`IPAdapterScaleCutoffCallback` needs: it leaves the scale at 0 otherwise. The weights stay in
memory, so attaching costs no disk read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from producer.errors import ModelError

IMAGE_EMBED_DIM = 32
TOKENS = 4  # diffusers reads a plain IP-Adapter's projection as four image tokens


@dataclass(frozen=True)
class IpAdapterParts:
    image_encoder: Any
    feature_extractor: Any
    state_dict: dict[str, dict[str, torch.Tensor]]


def tiny_parts(unet: Any, seed: int = 0) -> IpAdapterParts:
    """A CLIP vision encoder and IP-Adapter weights shaped for `unet`, random from a fixed seed."""
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            intermediate_size=37,
        )
    )
    processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    weights: dict[str, dict[str, torch.Tensor]] = {
        "image_proj": {
            "proj.weight": torch.randn(cross * TOKENS, IMAGE_EMBED_DIM, generator=generator) * 0.02,
            "proj.bias": torch.zeros(cross * TOKENS),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    # diffusers numbers the cross-attention processors 1, 3, 5, ... in `attn_processors` order.
    channels = list(unet.config.block_out_channels)
    cross_attention = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for key, name in zip(range(1, 2 * len(cross_attention), 2), cross_attention, strict=True):
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for part in ("to_k_ip", "to_v_ip"):
            weights["ip_adapter"][f"{key}.{part}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.02
    return IpAdapterParts(encoder, processor, weights)


def load_parts(weights: str, image_encoder: str, dtype: torch.dtype) -> IpAdapterParts:
    """An IP-Adapter from disk: its weights file and its CLIP vision encoder directory, read once."""
    try:
        if weights.endswith(".safetensors"):
            flat = safetensors.torch.load_file(weights)
            state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, tensor in flat.items():
                group, _, rest = key.partition(".")
                if group in state:
                    state[group][rest] = tensor
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=dtype, local_files_only=True)
        try:  # the encoder's own preprocessing when its directory has it, else CLIP's standard one
            processor = CLIPImageProcessor.from_pretrained(image_encoder, local_files_only=True)
        except OSError:
            processor = CLIPImageProcessor()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"could not load the IP-Adapter ({weights}, {image_encoder}): {exc}") from exc
    if not {"image_proj", "ip_adapter"} <= set(state):
        raise ModelError(f"{weights} is not an IP-Adapter: it has no image_proj and ip_adapter weights")
    return IpAdapterParts(encoder, processor, state)


@contextmanager
def attached(pipe: Any, parts: IpAdapterParts, scale: float) -> Iterator[None]:
    """The IP-Adapter in `pipe` for the block's duration; `image_embeds` reachable from step callbacks."""
    pipe.register_modules(
        image_encoder=parts.image_encoder.to(pipe.device, pipe.dtype), feature_extractor=parts.feature_extractor
    )
    state = {group: dict(tensors) for group, tensors in parts.state_dict.items()}
    pipe.load_ip_adapter(state, subfolder="", weight_name="in-memory.bin", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    # A CFG cutoff must also halve the IP-Adapter's image embeddings, a list the loop reads each step;
    # listing it lets the callback reach (and trim in place) that very list.
    pipe._callback_tensor_inputs = [*type(pipe)._callback_tensor_inputs, "image_embeds"]
    try:
        yield
    finally:
        del pipe._callback_tensor_inputs
        pipe.unload_ip_adapter()
