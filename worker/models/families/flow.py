"""What the flow-matching transformer families (Flux.1, SD3.5, ...) share: flow samplers, a transformer in the
loop, a preview fitted to each loaded model's own VAE, and the VAE decode of rows that leave a shared call."""

from __future__ import annotations

import threading
import weakref
from typing import Any, ClassVar

import torch

from producer.spec import RenderSpec
from worker.models import flow_sampling, preview_fit
from worker.models.families.base import ModelFamily

_MAPS: weakref.WeakKeyDictionary[Any, preview_fit.LatentRgb] = weakref.WeakKeyDictionary()
_MAPS_LOCK = threading.Lock()


def fitted_map(pipe: Any, family: FlowFamily) -> preview_fit.LatentRgb:
    """The latent->RGB map of `pipe`'s VAE, fitted on first use (float32 latents, through the family's own decode,
    `vae_pixels`) and kept while the VAE is loaded: a fine-tune or a new family gets a preview calibrated to its own
    decoder, with no copied factors."""
    vae = pipe.vae
    with _MAPS_LOCK:
        found = _MAPS.get(vae)
        if found is None:

            def decode(latents: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return (family.vae_pixels(pipe, latents.float()).float() / 2 + 0.5).clamp(0, 1)

            found = _MAPS[vae] = preview_fit.fit(decode, family.latent_channels(pipe), size=16, samples=8)
        return found


class FlowFamily(ModelFamily):
    """A flow-matching transformer family."""

    denoiser = "transformer"
    cuda_dtype = "bfloat16"  # trained in bfloat16; float16 overflows in their activations (Flux's notably)
    stochastic: ClassVar[frozenset[str]] = frozenset({"flow_euler_sde", "lcm"})

    def check_sampler(self, name: str, model: str) -> None:
        flow_sampling.check_flow_sampler(name, model)

    def make_scheduler(self, name: str, checkpoint_scheduler: Any) -> tuple[Any, Any]:
        return flow_sampling.make_flow_scheduler(name, checkpoint_scheduler)

    def before_call(self, spec: RenderSpec, seed: int) -> None:
        # The flow pipelines call `scheduler.step` without their generator, so a stochastic sampler draws its noise
        # from torch's global generator: seeded here, a seeded job renders the same image every time.
        if spec.scheduler in self.stochastic:
            torch.manual_seed(seed)

    def unpacked(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The loop's latents as (n, C, h, w) VAE latents (before the pipeline's scaling and shift)."""
        return latents

    def latent_channels(self, pipe: Any) -> int:
        """The channels of the VAE latents `unpacked` gives."""
        return int(pipe.vae.config.latent_channels)

    def vae_pixels(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) VAE latents as the loop has them -> the VAE's decode, (n, 3, H, W) in [-1, 1]: the pipeline's
        own steps before `vae.decode` undone first (here its scaling and shift). The decode of rows leaving a shared
        call and the fit of the preview map both go through it."""
        vae = pipe.vae
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image: torch.Tensor = vae.decode(z, return_dict=False)[0]
        return image

    def preview(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        return fitted_map(pipe, self).apply(self.unpacked(pipe, latents, height, width))

    def decode(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        with torch.inference_mode():
            image = self.vae_pixels(pipe, self.unpacked(pipe, latents, height, width))
            pixels: torch.Tensor = pipe.image_processor.postprocess(image, output_type="pt")
            return pixels.cpu()

    def batchable(self, pipe: Any) -> bool:
        return True
