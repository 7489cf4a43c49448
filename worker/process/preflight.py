"""Start-up checks: a worker whose settings cannot work says so in one line and exits before it takes a job.

A setting that is wrong at start (a model folder that does not exist, a bucket nobody created, a device that is not
there) would otherwise let the worker say `ready`, advertise its models and then fail every job it takes, while
its probes stay green. Each check here reads only what it must: a model's `model_index.json` and component
configs, a LoRA file's safetensors header, one probe object written and deleted under the storage prefix.

Each check imports torch, diffusers and the model families only when a setting needs them (a device other than
`cpu` or `auto`, a model entry, a LoRA file), and `render worker` runs these checks before it imports the rest of
the worker: a worker refused for a bad setting exits in about a second instead of after seconds of imports.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.errors import ConfigError, ModelError, StorageError
from worker.settings import TINY, Family, LoraSource, ModelSource, WorkerSettings

if TYPE_CHECKING:
    from worker.models.families import ModelFamily

PROBE_PREFIX = ".render-probe"
_FIX_MODELS = "fix the entry in RENDER_MODELS or remove it"


def check_worker(settings: WorkerSettings) -> None:
    """Raise `ConfigError` (one sentence naming the setting and the fix) for the first setting that cannot work."""
    check_device(settings)
    check_models(settings.models)
    check_loras(settings.loras)
    check_storage(settings)
    check_compile_cache(settings.compile_cache)


def check_compile_cache(path: str | None) -> None:
    """The shared inductor cache is a directory this worker can write (made if missing)."""
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"RENDER_COMPILE_CACHE={path!r} cannot be made ({exc.strerror or exc}); fix the path"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"RENDER_COMPILE_CACHE={path!r} is not writable by this worker; fix its permissions")


def check_device(settings: WorkerSettings) -> None:
    if settings.device in ("cpu", "auto"):  # always a device: `auto` falls back to the CPU (no torch import needed)
        return
    from worker.models.registry import resolve_device

    try:
        resolve_device(settings.device)
    except (ModelError, RuntimeError) as exc:  # RuntimeError: torch's own word on a malformed device string
        raise ConfigError(f"RENDER_DEVICE={settings.device!r}: {exc}") from None


def check_models(models: Mapping[str, ModelSource]) -> None:
    for name, model in models.items():
        if model.file is not None:
            check_file_model(name, model)
        elif model.tiny and model.source not in (built_in := _family(model.family).tiny):
            raise ConfigError(
                f"RENDER_MODELS: model {name!r}: {model.source!r} is not a built-in {model.family} model; use one "
                f"of: {', '.join(built_in)}, or a diffusers directory"
            )
        elif model.source is not None and not model.tiny:
            index = _config_file(model.source, "model_index.json")
            if index is None:
                raise ConfigError(
                    f"RENDER_MODELS: model {name!r}: {model.source!r} is neither a diffusers directory (with "
                    f"model_index.json) nor a hub id in the local cache; {_FIX_MODELS}"
                )
            _check_index(name, model.family, index)
        if model.controlnet and _config_file(model.controlnet, "config.json") is None:
            raise ConfigError(
                f"RENDER_MODELS: model {name!r}: controlnet {model.controlnet!r} is neither a directory with "
                f"config.json nor a hub id in the local cache; {_FIX_MODELS}"
            )
        if model.image_encoder and _config_file(model.image_encoder, "config.json") is None:
            raise ConfigError(
                f"RENDER_MODELS: model {name!r}: image_encoder {model.image_encoder!r} is not a directory with "
                f"config.json; {_FIX_MODELS}"
            )
        if model.ip_adapter and not os.path.isfile(model.ip_adapter):
            raise ConfigError(
                f"RENDER_MODELS: model {name!r}: ip_adapter {model.ip_adapter!r} is not a file; {_FIX_MODELS}"
            )


def check_file_model(name: str, model: ModelSource) -> None:
    """A single-file model: `base` is there and of its family, and the file's header is whole and of its family."""
    assert model.file is not None
    if model.base is None:
        raise ConfigError(
            f'RENDER_MODELS: model {name!r}: the file {model.file} needs "base": the local diffusers directory of the '
            f"{model.family} reference model (its configs and tokenizers, and the components the file lacks); add it"
        )
    from worker.models import single_file

    try:
        facts = single_file.inspect(model.file)
    except single_file.FileProblem as exc:
        raise ConfigError(f"RENDER_MODELS: model {name!r}: {exc}") from None
    if facts.family is None:
        raise ConfigError(
            f"RENDER_MODELS: model {name!r}: {model.file} holds no model of a family this worker runs (its "
            f"{len(facts.keys)} tensor names match none of them); check that it is the file you meant"
        )
    if facts.family != model.family:
        what = "whole checkpoint" if facts.holds == "pipeline" else _family(facts.family).denoiser
        raise ConfigError(
            f'RENDER_MODELS: model {name!r} says "family": "{model.family}" but {model.file} holds a {facts.family} '
            f'{what}; set "family" to "{facts.family}" or use a file of the {model.family} family'
        )
    family = _family(model.family)
    if facts.format == "gguf" and (facts.holds == "pipeline" or family.denoiser != "transformer"):
        raise ConfigError(
            f"RENDER_MODELS: model {name!r}: {model.file} is GGUF, which this worker loads for a transformer alone "
            "(Flux.1, SD3.5, Chroma, Qwen-Image, Z-Image, Flux.2); use a .safetensors file"
        )
    if facts.holds == "pipeline" and not family.whole_file_loader():
        raise ConfigError(
            f"RENDER_MODELS: model {name!r}: {model.file} is a whole {model.family} checkpoint, which diffusers loads "
            'only as the transformer alone; use a transformer-only file with the rest in "base"'
        )
    index = _config_file(model.base, "model_index.json")
    if index is None:
        raise ConfigError(
            f"RENDER_MODELS: model {name!r}: base {model.base!r} is neither a diffusers directory (with "
            f"model_index.json) nor a hub id in the local cache; point it at the {model.family} reference model's "
            "diffusers directory"
        )
    _check_index(name, model.family, index)


def check_loras(loras: Mapping[str, LoraSource]) -> None:
    for name, lora in loras.items():
        if lora.path == TINY:
            continue
        from worker.models.loras import file_problem

        problem = file_problem(lora.path)
        if problem:
            raise ConfigError(f"RENDER_LORAS: LoRA {name!r}: {problem}; fix its path or remove it")


def check_storage(settings: WorkerSettings) -> None:
    """Open the storage and write, read back and delete one probe object under its prefix."""
    from worker.storage import S3Storage, open_storage

    try:
        storage = open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, retry_seconds=settings.storage_retry_seconds
        )
        try:
            name = f"{PROBE_PREFIX}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            storage.put(name, b"probe", "text/plain")
            try:
                if storage.get(name) != b"probe":
                    raise StorageError(f"a probe object written to {storage.url(name)} did not read back")
            finally:
                storage.delete(name)
        finally:
            if isinstance(storage, S3Storage):
                storage.close()
    except StorageError as exc:
        raise ConfigError(f"RENDER_STORAGE_URL={settings.storage_url!r} cannot be used: {exc}") from None


def _config_file(source: str, name: str) -> Path | None:
    """`worker.models.single_file.config_file`, imported when first needed (it imports torch)."""
    from worker.models.single_file import config_file as find

    return find(source, name)


def _family(name: str) -> ModelFamily:
    """The family called `name`; the first call imports the families (diffusers, torch: seconds)."""
    from worker.models.families import family_named

    return family_named(name)


def _check_index(name: str, family: Family, index: Path) -> None:
    """The pipeline class in model_index.json is of `family`, and each component it lists has its folder."""
    from worker.models.families import family_of

    try:
        config: dict[str, Any] = json.loads(index.read_text())
        pipeline = str(config["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"RENDER_MODELS: model {name!r}: {index} cannot be read ({exc}); {_FIX_MODELS}") from None
    holds = family_of(pipeline)
    if holds is None or holds.name != family:
        raise ConfigError(
            f'RENDER_MODELS: model {name!r} says "family": "{family}" but {index} holds a {pipeline}; '
            f'set "family" to "{holds.name if holds else "a family this worker runs"}" or point it at a {family} model'
        )
    for component, value in config.items():
        listed = isinstance(value, list) and len(value) == 2 and value[0] is not None
        if listed and not component.startswith("_") and not (index.parent / component).is_dir():
            raise ConfigError(
                f"RENDER_MODELS: model {name!r}: {index} lists {component!r} but {index.parent / component} is "
                f"missing (an incomplete download?); {_FIX_MODELS}"
            )
