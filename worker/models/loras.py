"""LoRAs: allowlisted `.safetensors` files and the tiny models' built-in one, kept loaded (unfused) per model.

Adapters go in through diffusers' own loader (`load_lora_weights`, peft backend), which reads both the
diffusers format and the kohya format most shared LoRAs use. They live in the model's UNet and text
encoders, which the img2img/inpaint/ControlNet variants share, so what is loaded is tracked per model.
A job switches its own adapters on at its scales (`set_adapters`) and every LoRA layer off when it
ends: a disabled peft layer returns its base layer's output untouched, so the next job without LoRAs
gets a fresh pipeline's exact bytes. Nothing is fused: fusing writes into the base weights and
unfusing does not restore them bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import safetensors
import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.utils import logging as transformers_logging

from producer.errors import ModelError

UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TINY_RANK = 4
TINY_SEED = 0
TINY_STRENGTH = 4.0  # the tiny models' images change clearly (mean |difference| ~ 0.09 of full scale)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA as a job applied it: its allowlist name, its scale and the sha256 of its weights."""

    name: str
    scale: float
    sha256: str


@dataclass(frozen=True)
class Wanted:
    """One of a job's LoRAs, resolved: `weights` is a file path or the built-in state dict."""

    index: int
    name: str
    scale: float
    sha256: str
    weights: str | dict[str, torch.Tensor]

    @property
    def adapter(self) -> str:
        return adapter_name(self.name)


def adapter_name(name: str) -> str:
    """The peft adapter name for a LoRA name: letters and digits only, one name to one adapter.

    peft keys adapters in `ModuleDict`s (no '.') and warns about names inside its prefix `lora_`.
    """
    return "lora" + "".join(c if c.isalnum() and c != "x" else f"x{ord(c):02x}" for c in name)


# --- the built-in tiny LoRA ----------------------------------------------------------------------------------


def tiny_state_dict(pipe: Any, seed: int = TINY_SEED, rank: int = TINY_RANK) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA for `pipe`'s shapes in diffusers' format: the UNet's or transformer's attention and the CLIP
    text encoders' projections."""
    generator = torch.Generator().manual_seed(seed)

    def pair(key: str, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=generator) * TINY_STRENGTH / rank**0.5
        return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}

    weights: dict[str, torch.Tensor] = {}
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"  # SD's UNet, a DiT's transformer
    for name, module in getattr(pipe, denoiser).named_modules():
        if (".attn" in name or ".attention." in name) and name.endswith(UNET_TARGETS):  # Z-Image: `.attention.`
            # Once LoRAs are loaded, each target is a peft layer wrapping the original Linear.
            linear: Any = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            weights |= pair(f"{denoiser}.{name}", linear.in_features, linear.out_features)
    for encoder_name in TEXT_ENCODERS:
        encoder = getattr(pipe, encoder_name, None)
        if encoder is None or not getattr(encoder.config, "model_type", "").startswith("clip"):
            continue  # a T5 encoder (Flux's, SD3's third) takes no LoRA through diffusers' loaders
        width = encoder.config.hidden_size
        for layer in range(encoder.config.num_hidden_layers):
            for target in TEXT_TARGETS:
                # The transformers-4 module path, as LoRA files spell it; diffusers maps it onto transformers 5.
                weights |= pair(f"{encoder_name}.text_model.encoder.layers.{layer}.self_attn.{target}", width, width)
    return dict(sorted(weights.items()))


def state_dict_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the state dict's safetensors serialization (keys sorted): what the file would hash to."""
    cpu = {key: tensor.detach().cpu().contiguous() for key, tensor in sorted(weights.items())}
    return hashlib.sha256(safetensors.torch.save(cpu)).hexdigest()


# --- files ---------------------------------------------------------------------------------------------------


def file_problem(path: str) -> str | None:
    """Why `path` is not a usable LoRA file (a phrase), or None. Reads only the safetensors header."""
    if os.path.isdir(path):
        return f"{path} is a directory, not a .safetensors file"
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"{path} cannot be read (permission denied)"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except safetensors.SafetensorError as exc:
        return f"{path} is not a safetensors file ({exc})"
    if not any("lora" in key for key in keys):
        return f"{path} holds no LoRA weights (none of its {len(keys)} tensor names contains 'lora')"
    return None


# --- one model's adapters ------------------------------------------------------------------------------------


def adapters_in(pipe: Any) -> set[str]:
    """Every LoRA adapter loaded in `pipe`'s UNet and text encoders."""
    return {adapter for adapters in pipe.get_list_adapters().values() for adapter in adapters}


@dataclass
class ModelLoras:
    """The LoRAs loaded into one model's shared modules (name -> sha256, least recently used first)."""

    loaded: OrderedDict[str, str] = field(default_factory=OrderedDict)
    tiny: tuple[dict[str, torch.Tensor], str] | None = None

    def tiny_weights(self, pipe: Any) -> tuple[dict[str, torch.Tensor], str]:
        """The built-in LoRA for this model and its sha256, made once."""
        if self.tiny is None:
            weights = tiny_state_dict(pipe)
            self.tiny = (weights, state_dict_sha256(weights))
        return self.tiny

    def load(self, pipe: Any, wanted: list[Wanted], capacity: int) -> None:
        """Load what `wanted` lacks, first evicting the least recently used others down to `capacity`."""
        present = adapters_in(pipe)
        for name in [name for name in self.loaded if adapter_name(name) not in present]:
            del self.loaded[name]  # gone from the modules (the model was reloaded): forget it
        needed = {w.name for w in wanted}
        stale = {w.name for w in wanted if w.name in self.loaded and self.loaded[w.name] != w.sha256}
        missing = [w for w in wanted if w.name not in self.loaded or w.name in stale]
        kept = [name for name in self.loaded if name not in stale]
        evict = [name for name in kept if name not in needed][: max(0, len(kept) + len(missing) - capacity)]
        unknown = present - {adapter_name(name) for name in self.loaded}  # not loaded by us: weights unknown
        doomed = [*stale, *evict]
        if doomed or unknown:
            with _peft_warnings_expected():
                pipe.delete_adapters([adapter_name(name) for name in doomed] + sorted(unknown))
        for name in doomed:
            del self.loaded[name]
        for w in missing:
            _load(pipe, w)
            self.loaded[w.name] = w.sha256
        for w in wanted:
            self.loaded.move_to_end(w.name)


@contextmanager
def _peft_warnings_expected() -> Iterator[None]:
    """Silence peft's warnings about what this cache does on purpose: several adapters, deleting the active one.

    A job always names its active adapters itself (`activate`), so peft's choice of a new active one is moot.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
        warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted", UserWarning)
        yield


def _load(pipe: Any, wanted: Wanted) -> None:
    where = "the built-in weights" if isinstance(wanted.weights, dict) else wanted.weights
    options = {} if isinstance(wanted.weights, dict) else {"use_safetensors": True, "local_files_only": True}
    # A "Loading weights" bar per text encoder is noise in a worker log.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with _peft_warnings_expected():
            pipe.load_lora_weights(wanted.weights, adapter_name=wanted.adapter, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if wanted.adapter in adapters_in(pipe):  # loaded into some modules before failing in another
            with _peft_warnings_expected():
                pipe.delete_adapters([wanted.adapter])
        reason = " ".join(str(exc).split())  # torch lists every mismatched tensor, one per line
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelError(
            f"loras[{wanted.index}]: could not load LoRA {wanted.name!r} from {where} ({reason}); check that it is "
            "a LoRA for this model's family, in the diffusers or kohya format"
        ) from exc


def activate(pipe: Any, wanted: list[Wanted]) -> None:
    """Exactly `wanted`'s adapters on, at their scales; with none, every LoRA layer off."""
    if not wanted:
        deactivate(pipe)
        return
    pipe.enable_lora()
    pipe.set_adapters([w.adapter for w in wanted], adapter_weights=[w.scale for w in wanted])


def deactivate(pipe: Any) -> None:
    """Every LoRA layer off: each returns its base layer's output, bit for bit."""
    if adapters_in(pipe):
        pipe.disable_lora()
