"""The model allowlist and the per-process pipeline cache."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from producer.errors import ModelError, ModelLoadError, UnsupportedSpecError
from producer.spec import LoraRef
from worker import metrics
from worker.models import ip_adapter, variants
from worker.models.digests import FileDigests
from worker.models.families import family_named
from worker.models.families.base import ModelFamily
from worker.models.loras import AppliedLora, ModelLoras, Wanted, activate, deactivate, file_problem
from worker.settings import TINY, LoraSource, ModelSource, WorkerSettings, default_loras

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"RENDER_DEVICE={name} but no CUDA device is visible; set RENDER_DEVICE=cpu or auto")
    return device


def resolve_dtype(
    name: str, device: torch.device, family: ModelFamily | None = None, *, bf16_supported: bool | None = None
) -> torch.dtype:
    """RENDER_DTYPE as a torch dtype. `auto`: float32 on CPU; on CUDA the family's half type (`cuda_dtype`: bfloat16
    for the flow transformers, whose activations overflow float16; float16 for SD's UNets), float16 where the GPU has
    no bfloat16."""
    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type != "cuda":
        return torch.float32
    if family is not None and family.cuda_dtype == "bfloat16":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        if bf16_supported:
            return torch.bfloat16
    return torch.float16


class ModelRegistry:
    """Loads allowlisted pipelines on first use and keeps the most recent ones on the device."""

    def __init__(
        self,
        models: dict[str, ModelSource],
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_cached: int = 1,
        loras: Mapping[str, LoraSource] | None = None,
        max_cached_loras: int = 8,
        auto_dtype: bool = False,
    ) -> None:
        self.models = dict(models)
        self.device = device
        self.dtype = dtype  # the worker's; with `auto_dtype` each model's follows its family (`dtype_of`)
        self.auto_dtype = auto_dtype
        self.max_cached = max_cached
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.loads: dict[str, int] = {}  # pipelines loaded per model by this process (cache hits not counted)
        self.compile_seconds: dict[str, float] = {}  # compiled models: seconds their compile and warm-up took
        self._lock = threading.RLock()
        self._ip_adapters: dict[str, ip_adapter.IpAdapterParts] = {}
        self.loras = dict(default_loras() if loras is None else loras)
        self.max_cached_loras = max_cached_loras
        self._model_loras: dict[str, ModelLoras] = {}  # per model: its variants share the modules the LoRAs live in
        self._lora_digests = FileDigests()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ModelRegistry:
        device = resolve_device(settings.device)
        return cls(
            settings.models,
            device=device,
            dtype=resolve_dtype(settings.dtype, device),
            auto_dtype=settings.dtype == "auto",
            max_cached=settings.max_cached_models,
            loras=settings.loras,
            max_cached_loras=settings.max_cached_loras,
        )

    def source(self, name: str) -> ModelSource:
        try:
            return self.models[name]
        except KeyError:
            allowed = ", ".join(sorted(self.models)) or "(none)"
            raise ModelError(
                f"model {name!r} is not on this worker's allowlist; use one of: {allowed} (or add it to RENDER_MODELS)"
            ) from None

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype model `name` loads and runs in."""
        if not self.auto_dtype:
            return self.dtype
        return resolve_dtype("auto", self.device, family_named(self.source(name).family))

    def pipeline(self, name: str, kind: str = "text2img") -> Any:
        """The `kind` pipeline for `name`; the model is loaded once per process, its variants share it."""
        source = self.source(name)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
            else:
                while len(self._cache) >= self.max_cached:
                    evicted, _ = self._cache.popitem(last=False)
                    self._model_loras.pop(evicted, None)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                self._cache[name] = {"text2img": self._loaded(name, source, lambda: self._load(name, source))}
                self.loads[name] = self.loads.get(name, 0) + 1
                metrics.MODEL_LOADS.labels(model=name).inc()
            pipes = self._cache[name]
            if kind not in pipes:
                pipes[kind] = self._loaded(
                    name, source, lambda: variants.variant(pipes["text2img"], kind, source, self.dtype_of(name))
                )
            return pipes[kind]

    def refiner(self, base: str, name: str) -> Any:
        """Refiner `name`'s img2img pipeline for jobs of `base`, kept with `base`'s cached pipelines (a job needs
        both at once, so the refiner never evicts its base); `base` must be loaded (`pipeline(base)`) first."""
        source = self.source(name)
        with self._lock:
            pipes = self._cache[base]
            key = f"refiner:{name}"
            if key not in pipes:
                loaded = self._loaded(name, source, lambda: self._load(name, source))
                pipes[key] = self._loaded(
                    name, source, lambda: variants.variant(loaded, "img2img", source, self.dtype_of(name))
                )
                self.loads[name] = self.loads.get(name, 0) + 1
                metrics.MODEL_LOADS.labels(model=name).inc()
            return pipes[key]

    @staticmethod
    def _loaded(name: str, source: ModelSource, load: Callable[[], Any]) -> Any:
        """`load()`, whose failure (its files, the device's memory) is this model's on this worker: a ModelLoadError."""
        try:
            return load()
        except Exception as exc:
            detail = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(
                f"model {name!r} ({source.family}, {source.where}) could not be loaded: {detail}"
            ) from exc

    def check_ip_adapter(self, name: str) -> None:
        """Refuse an IP-Adapter job for a model that has none configured; reads nothing, loads nothing."""
        source = self.source(name)
        if not source.tiny and not (source.ip_adapter and source.image_encoder):
            raise UnsupportedSpecError(
                f'ip_adapter: no IP-Adapter is configured for {name!r}; add "ip_adapter" (weights file) and '
                '"image_encoder" (directory) to its RENDER_MODELS entry'
            )

    def ip_adapter(self, name: str) -> ip_adapter.IpAdapterParts:
        """The model's IP-Adapter parts, built (tiny) or read from disk once per process: on the GPU thread."""
        source = self.source(name)
        self.check_ip_adapter(name)
        with self._lock:
            if name not in self._ip_adapters:
                if source.ip_adapter and source.image_encoder:
                    parts = ip_adapter.load_parts(source.ip_adapter, source.image_encoder, self.dtype_of(name))
                else:
                    parts = ip_adapter.tiny_parts(self.pipeline(name).unet)
                self._ip_adapters[name] = parts
            return self._ip_adapters[name]

    def check_loras(self, model: str, refs: Sequence[LoraRef]) -> None:
        """Refuse, before any model loading, a LoRA this worker cannot apply to `model`; the message names loras[i].

        On a job's thread, without the registry's lock: its file reads (header, hash) never wait for a model the
        GPU thread is loading under the lock, nor make the GPU thread wait for them."""
        source = self.source(model)
        for index, ref in enumerate(refs):
            self._lora_source(index, ref, model, source)

    def loras_applied(
        self, model: str, pipe: Any, refs: Sequence[LoraRef]
    ) -> AbstractContextManager[list[AppliedLora]]:
        """Exactly `refs` active in `pipe` (a pipeline of `model`) for the block; no LoRA active after it.

        Adapters stay loaded across jobs, at most `max_cached_loras` per model (least recently used evicted,
        never one the job needs), so a LoRA used again costs no load.
        """
        return self._loras_applied(model, pipe, refs)

    @contextmanager
    def _loras_applied(self, model: str, pipe: Any, refs: Sequence[LoraRef]) -> Iterator[list[AppliedLora]]:
        try:
            with self._lock:
                state = self._model_loras.setdefault(model, ModelLoras())
                wanted = self._wanted(model, pipe, refs, state)
                if wanted:
                    state.load(pipe, wanted, self.max_cached_loras)
                activate(pipe, wanted)
            yield [AppliedLora(w.name, w.scale, w.sha256) for w in wanted]
        finally:
            with self._lock:
                deactivate(pipe)

    def _wanted(self, model: str, pipe: Any, refs: Sequence[LoraRef], state: ModelLoras) -> list[Wanted]:
        source = self.source(model)
        wanted = []
        for index, ref in enumerate(refs):
            lora = self._lora_source(index, ref, model, source)
            if lora.path == TINY:
                weights, sha256 = state.tiny_weights(pipe)
                wanted.append(Wanted(index, ref.name, ref.scale, sha256, weights))
            else:
                wanted.append(Wanted(index, ref.name, ref.scale, self._lora_digests.sha256(lora.path), lora.path))
        return wanted

    def _lora_source(self, index: int, ref: LoraRef, model: str, source: ModelSource) -> LoraSource:
        lora = self.loras.get(ref.name)
        if lora is None:
            allowed = ", ".join(sorted(self.loras)) or "(none)"
            raise UnsupportedSpecError(
                f"loras[{index}].name: {ref.name!r} is not on this worker's LoRA allowlist; use one of: {allowed} "
                "(or add it to RENDER_LORAS)"
            )
        if lora.path == TINY and not source.tiny:
            raise UnsupportedSpecError(
                f"loras[{index}].name: {ref.name!r} is the tiny models' built-in LoRA and model {model!r} is not a "
                f"tiny model; use an {source.family} LoRA file from RENDER_LORAS"
            )
        if lora.family is not None and lora.family != source.family:
            raise UnsupportedSpecError(
                f"loras[{index}].name: {ref.name!r} is an {lora.family} LoRA; model {model!r} is {source.family}; "
                f"use an {source.family} LoRA or an {lora.family} model"
            )
        if lora.path != TINY:
            problem = file_problem(lora.path)
            try:
                if problem is None:
                    self._lora_digests.sha256(lora.path)  # hashed once per file version, here rather than mid-job
            except OSError as exc:
                problem = f"{lora.path} cannot be read ({exc.strerror or exc})"
            if problem is not None:
                raise UnsupportedSpecError(
                    f"loras[{index}]: LoRA {ref.name!r} cannot be used: {problem}; fix its RENDER_LORAS entry"
                )
        return lora

    def _load(self, name: str, source: ModelSource) -> Any:
        family = family_named(source.family)
        dtype = self.dtype_of(name)
        started = time.perf_counter()
        if source.tiny:
            assert source.source is not None
            pipe = family.build_tiny(source.source).to(self.device)
            if dtype != torch.float32:  # built in float32; casting to it again only logs a warning
                pipe = pipe.to(dtype=dtype)
        elif source.file is not None:
            assert source.base is not None  # the start-up checks refuse a file without its base
            pipe = family.load_file(source.file, source.base, dtype).to(self.device)
        else:
            assert source.source is not None
            pipe = family.load(source.source, dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if source.compile != "off":
            self._compiled(name, source, family, pipe, time.perf_counter() - started)
        return pipe

    def _compiled(self, name: str, source: ModelSource, family: Any, pipe: Any, load_seconds: float) -> None:
        """Compile the model and make one short warm-up render, so the first job pays no compile: the time both took
        goes to `compile_seconds` (the worker's advert) and the `render_compile_seconds` metric."""
        started = time.perf_counter()
        family.compile(pipe, source.compile)
        with torch.inference_mode():
            pipe(
                prompt="warm-up",
                num_inference_steps=2,
                width=source.warmup_size,
                height=source.warmup_size,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            )
        seconds = time.perf_counter() - started
        self.compile_seconds[name] = round(seconds, 3)
        metrics.COMPILE_SECONDS.labels(model=name).observe(seconds)
        log.info(
            "model %r compiled (%s) and warmed up in %.1f s (loaded in %.1f s)",
            name,
            source.compile,
            seconds,
            load_seconds,
        )

    def is_loaded(self, name: str) -> bool:
        return name in self._cache

    def loaded_models(self) -> list[str]:
        """The models loaded in this process now, least recently used first."""
        with self._lock:
            return list(self._cache)
