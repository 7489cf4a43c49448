"""The model allowlist and the per-process pipeline cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from producer.errors import ModelError, UnsupportedSpecError
from worker.models import ip_adapter, pretrained, tiny_sd15, tiny_sdxl, variants
from worker.settings import TINY, ModelSource, WorkerSettings

_TINY_BUILDERS: dict[str, Callable[[], Any]] = {"sd15": tiny_sd15.build, "sdxl": tiny_sdxl.build}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"RENDER_DEVICE={name} but no CUDA device is visible; set RENDER_DEVICE=cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class ModelRegistry:
    """Loads allowlisted pipelines on first use and keeps the most recent ones on the device."""

    def __init__(
        self,
        models: dict[str, ModelSource],
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_cached: int = 1,
    ) -> None:
        self.models = dict(models)
        self.device = device
        self.dtype = dtype
        self.max_cached = max_cached
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()
        self._ip_adapters: dict[str, ip_adapter.IpAdapterParts] = {}

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ModelRegistry:
        device = resolve_device(settings.device)
        return cls(
            settings.models,
            device=device,
            dtype=resolve_dtype(settings.dtype, device),
            max_cached=settings.max_cached_models,
        )

    def source(self, name: str) -> ModelSource:
        try:
            return self.models[name]
        except KeyError:
            allowed = ", ".join(sorted(self.models)) or "(none)"
            raise ModelError(
                f"model {name!r} is not on this worker's allowlist; use one of: {allowed} (or add it to RENDER_MODELS)"
            ) from None

    def pipeline(self, name: str, kind: str = "text2img") -> Any:
        """The `kind` pipeline for `name`; the model is loaded once per process, its variants share it."""
        source = self.source(name)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
            else:
                while len(self._cache) >= self.max_cached:
                    self._cache.popitem(last=False)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                self._cache[name] = {"text2img": self._load(source)}
            pipes = self._cache[name]
            if kind not in pipes:
                pipes[kind] = variants.variant(pipes["text2img"], kind, source, self.dtype)
            return pipes[kind]

    def ip_adapter(self, name: str) -> ip_adapter.IpAdapterParts:
        """The model's IP-Adapter parts, built (tiny) or read from disk once per process."""
        source = self.source(name)
        if source.source != TINY and not (source.ip_adapter and source.image_encoder):
            raise UnsupportedSpecError(
                f'ip_adapter: no IP-Adapter is configured for {name!r}; add "ip_adapter" (weights file) and '
                '"image_encoder" (directory) to its RENDER_MODELS entry'
            )
        with self._lock:
            if name not in self._ip_adapters:
                if source.ip_adapter and source.image_encoder:
                    parts = ip_adapter.load_parts(source.ip_adapter, source.image_encoder, self.dtype)
                else:
                    parts = ip_adapter.tiny_parts(self.pipeline(name).unet)
                self._ip_adapters[name] = parts
            return self._ip_adapters[name]

    def _load(self, source: ModelSource) -> Any:
        if source.source == TINY:
            pipe = _TINY_BUILDERS[source.family]().to(self.device)
            if self.dtype != torch.float32:  # built in float32; casting to it again only logs a warning
                pipe = pipe.to(dtype=self.dtype)
        else:
            pipe = pretrained.load(source.family, source.source, self.dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def is_loaded(self, name: str) -> bool:
        return name in self._cache
