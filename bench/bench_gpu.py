"""Full-size SD 1.5 and SDXL architectures with random weights, for timing on a GPU without any hub access.

The configs below are the published ones (`unet/config.json`, `vae/config.json`,
`text_encoder*/config.json` of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0), written
out in code. The tokenizer is the project's offline byte-level CLIP tokenizer (token ids fit the
real vocabulary size). Random fp16 weights give meaningless images at the real cost.

`--dry-run` (and any machine without CUDA) builds every model on the `meta` device, which
allocates nothing, and checks the parameter counts against the published ones. On a GPU,
`run()` saves each random pipeline as a diffusers directory, allowlists it through RENDER_MODELS
for this process and the workers it starts, and runs the worker-overhead, callback, CFG and
frames benchmarks on it, and the throughput benchmark (overlap, and batches of 8) at its full size.

    python bench/bench_gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import Section

# --- the published configs ------------------------------------------------------------------------------------

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def vae_config(sample_size: int, scaling_factor: float, force_upcast: bool) -> dict[str, Any]:
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower: SD 1.5, and SDXL's first encoder
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
}
CLIP_BIGG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's second encoder
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 1280,
    "layer_norm_eps": 1e-05,
}

# Parameter counts of the published checkpoints: what the configs above must rebuild.
PUBLISHED_PARAMETERS = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


@dataclass(frozen=True)
class FullModel:
    name: str
    family: str
    size: int
    steps: int


FULL_MODELS = (FullModel("full-sd15", "sd15", 512, 30), FullModel("full-sdxl", "sdxl", 1024, 30))


def components(family: str) -> dict[str, Callable[[], Any]]:
    """Constructors of each model of the family, full size, default (random) initialisation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from worker.models.tokenizer import BOS, EOS, vocabulary

    vocab = vocabulary()
    ids: dict[str, Any] = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    if family == "sd15":
        return {
            "unet": lambda: UNet2DConditionModel(**SD15_UNET),
            "vae": lambda: AutoencoderKL(**vae_config(512, 0.18215, False)),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
        }
    if family == "sdxl":
        return {
            "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
            "vae": lambda: AutoencoderKL(**vae_config(1024, 0.13025, True)),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)),
        }
    raise ValueError(f"unknown family {family!r}; use sd15 or sdxl")


def parameter_counts(family: str) -> dict[str, int]:
    """Build each full-size model on the meta device (no memory for weights) and count its parameters."""
    from accelerate import init_empty_weights

    counts = {}
    for name, build in components(family).items():
        with init_empty_weights():
            model = build()
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def dry_run(section: Section) -> bool:
    """Check that the configs rebuild the published architectures; True when every count matches."""
    rows, ok = [], True
    for family in ("sd15", "sdxl"):
        for name, count in parameter_counts(family).items():
            published = PUBLISHED_PARAMETERS[(family, name)]
            ok &= count == published
            rows.append([family, name, f"{count:,}", f"{published:,}", "yes" if count == published else "NO"])
    section.table(["family", "model", "parameters (built on meta)", "published", "match"], rows, align="llrrl")
    return ok


# --- on a GPU -------------------------------------------------------------------------------------------------


def save_random_pipeline(model: FullModel, root: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Build the full-size pipeline with random weights on the GPU and save it as a diffusers directory."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from worker.models.tiny_sd15 import euler_scheduler
    from worker.models.tokenizer import tiny_clip_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        parts = {name: build().to(dtype) for name, build in components(model.family).items()}
    if model.family == "sd15":
        pipe = StableDiffusionPipeline(
            **parts,
            tokenizer=tiny_clip_tokenizer(),
            scheduler=euler_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            **parts,
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(),
            scheduler=euler_scheduler(),
            add_watermarker=False,
        )
    path = root / model.name
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, parts
    torch.cuda.empty_cache()
    return path


@contextmanager
def allowlisted(models: dict[str, tuple[str, Path]]) -> Iterator[None]:
    """RENDER_MODELS naming the saved pipelines, for this process and the worker processes it starts."""
    before = os.environ.get("RENDER_MODELS")
    entries = {"tiny-sd15": {"family": "sd15", "source": "tiny"}, "tiny-sdxl": {"family": "sdxl", "source": "tiny"}}
    entries.update({name: {"family": family, "source": str(path)} for name, (family, path) in models.items()})
    os.environ["RENDER_MODELS"] = json.dumps(entries)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RENDER_MODELS", None)
        else:
            os.environ["RENDER_MODELS"] = before


def run(*, repeats: int = 5) -> list[Section]:
    """The GPU part of the suite, or one section saying why it was skipped (with the config check)."""
    section = Section("GPU: full-size SD 1.5 and SDXL, random fp16 weights")
    section.line("Configs rebuilt from the published ones (meta device, no allocation):")
    section.line()
    configs_ok = dry_run(section)
    if not configs_ok:
        section.line("**The configs do not rebuild the published architectures; see the table.**")
    if not torch.cuda.is_available():
        section.line(
            "GPU benchmarks **skipped**: no CUDA device on this machine (torch.cuda.is_available() is False). "
            "On a GPU machine `make bench` runs the worker-overhead, callback, CFG-cutoff and frames figures on "
            + " and ".join(f"{m.name} ({m.size}x{m.size}, {m.steps} steps)" for m in FULL_MODELS)
            + "."
        )
        return [section]

    import bench_render
    import bench_throughput
    import bench_worker

    section.line(f"GPU: {torch.cuda.get_device_name(0)}; fp16; weights saved to a temporary directory first.")
    sections = [section]
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-models-"))
    saved = {m.name: (m.family, save_random_pipeline(m, root)) for m in FULL_MODELS}
    with allowlisted(saved):
        for m in FULL_MODELS:
            case = bench_worker.Case(f"{m.name}", m.size, m.steps)
            worker_section, _ = bench_worker.run(model=m.name, repeats=repeats, threads=1, cases=(case,), device="cuda")
            worker_section.title = f"GPU {m.name}: " + worker_section.title
            sections.append(worker_section)
            rendered = bench_render.run(
                model=m.name, repeats=repeats, threads=1, cases=(case,), all_cores_frames=False, device="cuda"
            )
            for render_section in rendered.sections:
                render_section.title = f"GPU {m.name}: " + render_section.title
                sections.append(render_section)
            full = bench_worker.Case(m.name, m.size, m.steps)
            throughput_section, _ = bench_throughput.run(
                model=m.name, overlap_case=full, batch_case=full, device="cuda", repeats=max(2, repeats // 2)
            )
            throughput_section.title = f"GPU {m.name}: " + throughput_section.title
            sections.append(throughput_section)
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="only build the configs on the meta device")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.dry_run:
        if not dry_run(Section("Full-size configs (meta device)")):
            raise SystemExit("the configs do not rebuild the published parameter counts")
        return
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
