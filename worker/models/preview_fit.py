"""A linear latents-to-RGB preview fitted to a loaded model's own VAE, for families with no hand-made factors.

A preview frame is one matrix product per latent pixel: `weights @ latent + bias`. Instead of copying a
published table, `fit` decodes a few synthetic latent images with the model's VAE, shrinks each decode to the
latent grid, and solves for the map by least squares. The latents `fit` draws are half N(0, 1) noise, half
smooth fields (N(0, 1) on a coarse grid, upsampled and brought back to unit variance). The denoising loop starts
from noise, but the preview matters most near the end, where the latents are image-like: spatially smooth, with
roughly unit variance in the loop's space (what the VAE's scaling factor is chosen for). The noise covers every
direction of the latent space; the smooth half gives the decoder inputs in which a latent pixel's neighbours
agree with it, so what the VAE does across pixels does not blur the per-pixel fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# How much coarser the smooth half's random grid is than the latent grid: features of a few latent pixels.
_SMOOTH_FACTOR = 4


@dataclass(frozen=True)
class LatentRgb:
    """A per-pixel affine map from a loop latent vector (C,) to RGB in 0..255: `weights` (3, C), `bias` (3,)."""

    weights: torch.Tensor
    bias: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.weights.shape[1])

    def to(self, device: torch.device | str) -> LatentRgb:
        """This map with its tensors on `device`: keep one there, so `apply` copies nothing per frame."""
        return LatentRgb(self.weights.to(device), self.bias.to(device))

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) latents -> (n, h, w, 3) uint8 on the latents' device, clamped (never wrapped)."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"the preview needs (n, {self.channels}, h, w) latents; got {tuple(latents.shape)}")
        weights = self.weights.to(latents.device)
        bias = self.bias.to(latents.device)
        rgb = torch.einsum("nlhw,rl->nhwr", latents.float(), weights) + bias
        return rgb.clamp(0, 255).to(torch.uint8)


def sample_latents(channels: int, size: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """`samples` latent images (samples, channels, size, size) on the CPU: the first half N(0, 1), the rest smooth."""
    noise = samples - samples // 2
    white = torch.randn(noise, channels, size, size, generator=generator)
    coarse = max(1, math.ceil(size / _SMOOTH_FACTOR))
    low = torch.randn(samples - noise, channels, coarse, coarse, generator=generator)
    smooth = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    # Upsampling lowers the variance; bring each image's channels back to unit standard deviation.
    smooth = smooth / smooth.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return torch.cat([white, smooth])


def fit(
    decode: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    *,
    size: int = 32,
    samples: int = 8,
    seed: int = 0,
) -> LatentRgb:
    """The least-squares map from loop latents to the VAE's colours, fitted on `samples` latent images.

    `size` is the side of each latent image in latent pixels (32 decodes to 256 px with an 8x VAE); `decode`
    takes (n, C, h, w) loop latents and returns pixels in [0, 1], (n, 3, H, W) with H = h * the VAE's scale
    (`decoder_for` makes one). The decodes are averaged down to the latent grid, and
    [latent, 1] @ A = rgb * 255 is solved in float64. The same seed gives the same map.
    """
    if samples < 1 or size < 1:
        raise ValueError(f"fit needs at least one sample of at least one latent pixel; got {samples=}, {size=}")
    generator = torch.Generator().manual_seed(seed)
    latents = sample_latents(channels, size, samples, generator)
    pixels = decode(latents).detach().to("cpu", torch.float64)
    if pixels.shape[:2] != (samples, 3) or pixels.shape[2] % size or pixels.shape[3] % size:
        raise ValueError(f"decode must return (n, 3, h * scale, w * scale) pixels; got {tuple(pixels.shape)}")
    if not torch.isfinite(pixels).all():
        raise ValueError("the VAE decoded to NaN or inf (a float16 VAE that overflows?); fit it in float32")
    rgb = downsample(pixels, pixels.shape[2] // size) * 255  # (n, 3, h, w)
    x = latents.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
    return LatentRgb(
        weights=solution[:channels].T.contiguous().float(),
        bias=solution[channels].contiguous().float(),
    )


def downsample(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 3, H / scale, W / scale): each latent pixel's patch averaged."""
    return F.avg_pool2d(pixels, kernel_size=scale) if scale > 1 else pixels


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) pixels in [0, 1] -> (n, h, w, 3) uint8, rounded: the reference a preview is scored against."""
    return (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def psnr(preview: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two (n, h, w, 3) uint8 images; inf where they are equal."""
    if preview.shape != reference.shape:
        raise ValueError(f"psnr needs images of one shape; got {tuple(preview.shape)} and {tuple(reference.shape)}")
    mse = (preview.double() - reference.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def decoder_for(pipe: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """`decode` for `fit`: loop latents (n, C, h, w) -> the pipeline's VAE decode as pixels in [0, 1].

    First undoes what the pipeline does to latents before `vae.decode`: SDXL's `latents_mean`/`latents_std`
    when the VAE's config sets both, else `latents / scaling_factor (+ shift_factor)` (SD3, Flux). Packed
    latents (Flux's (B, seq, 64)) must be unpacked by the caller.
    """
    vae = pipe.vae
    config = vae.config

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = latents.to(vae.device, vae.dtype)
            mean = getattr(config, "latents_mean", None)
            std = getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, z.shape[1], 1, 1)
                mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
                std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
                z = z * std_t / config.scaling_factor + mean_t
            else:
                z = z / config.scaling_factor
                shift = getattr(config, "shift_factor", None)
                if shift is not None:
                    z = z + shift
            image: torch.Tensor = vae.decode(z).sample
            return (image.float() / 2 + 0.5).clamp(0, 1)

    return decode
