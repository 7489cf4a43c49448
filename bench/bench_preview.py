"""Benchmark the linear latents-to-RGB preview fitted against each model's own VAE (worker/models/preview_fit.py).

Per model, PSNR of the preview against the VAE's real decode (averaged down to the latent grid) on held-out
latents (`sample_latents` with another seed than the fit's: half N(0, 1) noise, half smooth image-like fields,
scored apart), beside the best constant colour (the decodes' own mean); then the seconds of one fit and the
microseconds of one preview of a 1024x1024 image's latents (128x128). Models: tiny-sd15 with the hand-made
SD 1.5 factors and with a fitted map, and a tiny 16-channel VAE (Flux/SD3-shaped latents) fitted.
The tiny VAEs have random weights: their decode is mostly not linear in the latents, so the fitted map beats
the mean colour by about a dB; what the figures show is the fit against the hand-made factors and its cost.

    python bench/bench_preview.py [--repeats 5] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import Section, interleaved, median, set_threads, spread
from diffusers import AutoencoderKL

from worker.models import tiny_sd15
from worker.models.families.sd import linear_preview
from worker.models.preview_fit import LatentRgb, decoder_for, downsample, fit, psnr, sample_latents, to_uint8

HELD_OUT_SEED = 1
HELD_OUT = 8  # latent images, 32x32 each; the first half noise, the second smooth
SIZE = 32
PREVIEW_GRID = 128  # a 1024x1024 image's latents


@dataclass
class VaeOnly:
    """What `decoder_for` reads of a pipeline: its `vae`."""

    vae: AutoencoderKL


def tiny_vae16() -> AutoencoderKL:
    """tiny-sd15's VAE shape with 16 latent channels and a shift factor, as Flux's and SD3's VAEs have."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


@dataclass
class Model:
    name: str
    channels: int
    decode: Callable[[torch.Tensor], torch.Tensor]
    latents: torch.Tensor
    reference: torch.Tensor  # (n, h, w, 3) uint8: the held-out latents' decode on the latent grid

    @classmethod
    def of(cls, name: str, pipe: Any, channels: int) -> Model:
        decode = decoder_for(pipe)
        latents = sample_latents(channels, SIZE, HELD_OUT, torch.Generator().manual_seed(HELD_OUT_SEED))
        pixels = decode(latents)
        return cls(name, channels, decode, latents, to_uint8(downsample(pixels.double(), pixels.shape[2] // SIZE)))

    def scores(self, preview: torch.Tensor) -> list[str]:
        """PSNR on every held-out image, on the noise half, on the smooth half."""
        half = HELD_OUT // 2
        parts = (slice(None), slice(None, half), slice(half, None))
        return [f"{psnr(preview[part], self.reference[part]):.2f}" for part in parts]

    def mean_colour(self) -> torch.Tensor:
        """The best constant preview of each half: that half's mean decoded colour."""
        half = HELD_OUT // 2
        means = [self.reference[part].double().mean(dim=(0, 1, 2)) for part in (slice(None, half), slice(half, None))]
        rows = [means[0]] * half + [means[1]] * (HELD_OUT - half)
        return torch.stack(rows).round().to(torch.uint8)[:, None, None, :].expand_as(self.reference).contiguous()


def preview_micros(apply: Callable[[torch.Tensor], torch.Tensor], channels: int, calls: int = 50) -> float:
    """Median µs of one preview of a (1, C, 128, 128) latent, each call timed alone."""
    latents = torch.randn(1, channels, PREVIEW_GRID, PREVIEW_GRID, generator=torch.Generator().manual_seed(2))
    apply(latents)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        apply(latents)
        samples.append(time.perf_counter() - started)
    return median(samples) * 1e6


def fitter(model: Model) -> Callable[[], LatentRgb]:
    return lambda: fit(model.decode, model.channels)


def run(repeats: int = 5, threads: int = 1) -> Section:
    set_threads(threads)
    rounds = -(-repeats // 2) * 2  # a multiple of the two models, so each fits first equally often
    section = Section(
        "Preview fitted per model against its VAE",
        f"`bench/bench_preview.py`: torch threads {threads}, CPU. PSNR (dB) against the VAE decode averaged to the "
        f"latent grid, on {HELD_OUT} held-out {SIZE}x{SIZE} latents (half noise, half smooth); fit: "
        f"`fit(decode, C)` defaults ({SIZE}x{SIZE} latents, 8 samples), median of {rounds} interleaved; preview: one "
        f"{PREVIEW_GRID}x{PREVIEW_GRID} latent (a 1024x1024 image), median of 50 calls.",
    )
    models = [Model.of("tiny-sd15", tiny_sd15.build(), 4), Model.of("tiny 16-channel VAE", VaeOnly(tiny_vae16()), 16)]
    fits = interleaved({m.name: fitter(m) for m in models}, rounds)
    rows: list[list[str]] = []
    for model in models:
        fitted = fit(model.decode, model.channels)
        seconds = fits[model.name]
        fit_cell = f"{median(seconds) * 1e3:.0f} (±{spread(seconds):.0%})"
        rows.append([model.name, "mean colour (each half's own)", *model.scores(model.mean_colour()), "", ""])
        if model.channels == 4:
            hand = model.scores(linear_preview(model.latents, "sd15"))
            micros = preview_micros(lambda z: linear_preview(z, "sd15"), 4)
            rows.append([model.name, "hand-made SD 1.5 factors", *hand, "", f"{micros:.0f}"])
        micros = preview_micros(fitted.apply, model.channels)
        rows.append([model.name, "fitted", *model.scores(fitted.apply(model.latents)), fit_cell, f"{micros:.0f}"])
    section.table(
        ["model", "preview", "PSNR all", "PSNR noise", "PSNR smooth", "fit ms", "preview µs"], rows, align="llrrrrr"
    )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    run(args.repeats, args.torch_threads)


if __name__ == "__main__":
    main()
