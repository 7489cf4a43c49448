"""Single-file checkpoints made from diffusers pipelines, for tests of single-file model loading.

diffusers' `from_single_file` reads the original (LDM / A1111) layout and converts it to its own;
nothing in diffusers writes that layout. These functions are the inverse of its conversion
(`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`). The key mapping follows the
diffusers repository's `scripts/convert_diffusers_to_original_stable_diffusion.py` and
`scripts/convert_diffusers_to_original_sdxl.py` (Apache-2.0), with the block indices computed from
the pipeline's own config instead of the real models' fixed sizes, so tiny pipelines convert too.

Layout written:
- UNet: `model.diffusion_model.*`; VAE: `first_stage_model.*`;
- SD 1.5 CLIP: `cond_stage_model.transformer.text_model.*`;
- SDXL CLIP-L: `conditioner.embedders.0.transformer.text_model.*`; the OpenCLIP-G encoder
  (`text_encoder_2`): `conditioner.embedders.1.model.*` (fused `in_proj` weights, transposed
  `text_projection`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "SD15_CLIP_PREFIX",
    "SDXL_CLIP_PREFIX",
    "SDXL_OPEN_CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "clip_to_original",
    "open_clip_to_original",
    "truncate",
    "unet_to_original",
    "vae_to_original",
    "write_diffusers_transformer",
    "write_sd15_checkpoint",
    "write_sdxl_checkpoint",
]

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {  # diffusers -> original, inside a ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _tensors(module: torch.nn.Module) -> StateDict:
    """The module's state dict, each tensor detached and in its own contiguous storage (safetensors refuses shared)."""
    return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in module.state_dict().items()}


def _split(key: str, prefixes: dict[str, str]) -> tuple[str, str, str]:
    """(diffusers prefix, its original name, the rest of the key) for the prefix of `key` in `prefixes`."""
    for old, new in prefixes.items():
        if key.startswith(old + "."):
            return old, new, key[len(old) + 1 :]
    raise ValueError(f"no original-layout name for {key!r}; the converter knows only {sorted(prefixes)}")


def _unet_prefixes(config: Any, state: StateDict) -> dict[str, str]:
    """Diffusers module prefix -> original prefix, block indices derived from the UNet config."""
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"unet.config.layers_per_block must be one int for the original layout; got {per_block!r}")
    stride = per_block + 1
    prefixes = dict(_UNET_TOP)
    for i in range(len(config.down_block_types)):
        for j in range(per_block):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * stride + j}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * stride + j}.1"
        prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * stride}.0.op"
    prefixes["mid_block.resnets.0"] = "middle_block.0"
    prefixes["mid_block.attentions.0"] = "middle_block.1"
    prefixes["mid_block.resnets.1"] = "middle_block.2"
    for i in range(len(config.up_block_types)):
        for j in range(stride):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * stride + j}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * stride + j}.1"
        # the upsampler follows the block's last resnet, and its attention where the block has one
        slot = 2 if any(key.startswith(f"up_blocks.{i}.attentions.") for key in state) else 1
        prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * stride + per_block}.{slot}.conv"
    return prefixes


def unet_to_original(unet: torch.nn.Module) -> StateDict:
    """The UNet's weights under original (LDM) names, without the `model.diffusion_model.` prefix."""
    state = _tensors(unet)
    prefixes = _unet_prefixes(unet.config, state)
    out: StateDict = {}
    for key, tensor in state.items():
        old, new, rest = _split(key, prefixes)
        if ".resnets." in old:
            child, _, leaf = rest.partition(".")
            rest = _UNET_RESNET.get(child, child) + "." + leaf
        out[f"{new}.{rest}"] = tensor
    return out


def vae_to_original(vae: torch.nn.Module) -> StateDict:
    """The VAE's weights under original (LDM) names, without the `first_stage_model.` prefix."""
    state = _tensors(vae)
    config: Any = vae.config
    prefixes: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    count = len(config.down_block_types)
    for part in ("encoder", "decoder"):
        prefixes.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out"})
        prefixes[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}"] = f"{part}.mid.block_{k + 1}"
    for i in range(count):
        # the decoder's up blocks are numbered from the top in diffusers and from the bottom in the original
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{count - 1 - i}.upsample.conv"
        for j in range(config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{count - 1 - i}.block.{j}"
    out: StateDict = {}
    for key, tensor in state.items():
        old, new, rest = _split(key, prefixes)
        if ".resnets." in old:
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        elif ".attentions." in old:
            module, _, leaf = rest.rpartition(".")
            rest = _VAE_ATTENTION[module] + "." + leaf
            if module != "group_norm" and leaf == "weight":
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # the original's attention projections are 1x1 convs
        out[f"{new}.{rest}"] = tensor
    return out


def _text_model_keys(state: StateDict) -> StateDict:
    """`state` with every key under `text_model.` (transformers 5.6+ flattened `CLIPTextModel`; older ones nest it)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}


def clip_to_original(text_encoder: torch.nn.Module) -> StateDict:
    """An OpenAI CLIP text encoder's weights as the original stores them under its `.transformer.` prefix."""
    return _text_model_keys(_tensors(text_encoder))


def open_clip_to_original(text_encoder: torch.nn.Module) -> StateDict:
    """A `CLIPTextModelWithProjection`'s weights in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    state = _tensors(text_encoder)
    out: StateDict = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
            continue
        name = key.removeprefix("text_model.")
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = tensor
        elif match := _QKV.match(name):
            fused.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif match := _LAYER.match(name):
            rest = match[2]
            for old, new in _OPEN_CLIP_LAYER:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            else:
                raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
            out[f"transformer.resblocks.{match[1]}.{rest}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
    for (layer, leaf), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _prefixed(prefix: str, state: StateDict) -> StateDict:
    return {prefix + key: tensor for key, tensor in state.items()}


def _save(state: StateDict, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target))
    return target


def write_sd15_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Write a Stable Diffusion 1.5 pipeline's UNet, VAE and CLIP text encoder as one original-layout file.

    The file loads with `StableDiffusionPipeline.from_single_file(path, config=<the pipeline saved with
    save_pretrained>)`; the scheduler and tokenizer come from that directory. Returns the path written.
    """
    state = {
        **_prefixed(UNET_PREFIX, unet_to_original(pipe.unet)),
        **_prefixed(VAE_PREFIX, vae_to_original(pipe.vae)),
        **_prefixed(SD15_CLIP_PREFIX, clip_to_original(pipe.text_encoder)),
    }
    return _save(state, path)


def write_sdxl_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Write a Stable Diffusion XL pipeline's UNet, VAE and both text encoders as one original-layout file.

    `text_encoder` is written as the CLIP-L embedder (0), `text_encoder_2` as the OpenCLIP-G embedder (1).
    The file loads with `StableDiffusionXLPipeline.from_single_file(path, config=<saved directory>)`.
    Returns the path written.
    """
    state = {
        **_prefixed(UNET_PREFIX, unet_to_original(pipe.unet)),
        **_prefixed(VAE_PREFIX, vae_to_original(pipe.vae)),
        **_prefixed(SDXL_CLIP_PREFIX, clip_to_original(pipe.text_encoder)),
        **_prefixed(SDXL_OPEN_CLIP_PREFIX, open_clip_to_original(pipe.text_encoder_2)),
    }
    return _save(state, path)


def write_diffusers_transformer(pipe: Any, path: str | Path) -> Path:
    """Write the pipeline's `transformer` state dict, diffusers' own keys, as one .safetensors file."""
    return _save(_tensors(pipe.transformer), path)


def truncate(path: str | Path, out: str | Path, *, missing: int = 64) -> Path:
    """Copy `path` to `out` without its last `missing` bytes, as a download cut short leaves it."""
    source, target = Path(path), Path(out)
    size = source.stat().st_size
    if not 0 < missing < size:
        raise ValueError(f"missing must be between 1 and {size - 1} bytes for {source}; got {missing}")
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer)
        writer.truncate(size - missing)
    return target


GGUF_BLOCK = 32  # the row length Q8_0 and Q4_0 quantize in blocks of


def write_gguf_transformer(pipe: Any, path: str | Path, quantization: str = "Q8_0") -> Path:
    """`pipe.transformer` as a GGUF file with diffusers' keys, written with the `gguf` package: each linear layer's
    weight whose rows are a whole number of `quantization`'s blocks is quantized (diffusers dequantizes those, as
    GGUF tools make them), the rest (biases, norms, pad tokens, odd shapes) kept as float32; the file's
    `render.quantized` field says how many were."""
    import gguf

    kind = gguf.GGMLQuantizationType[quantization]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="render-test")
    linear = {
        f"{name}.weight" for name, module in pipe.transformer.named_modules() if isinstance(module, torch.nn.Linear)
    }
    quantized = 0
    for key, tensor in _tensors(pipe.transformer).items():
        array = tensor.detach().float().cpu().numpy()
        if key in linear and array.shape[-1] % GGUF_BLOCK == 0:
            packed = gguf.quants.quantize(array, kind)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=kind)
            quantized += 1
        else:
            writer.add_tensor(key, array)
    writer.add_uint32("render.quantized", quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path
