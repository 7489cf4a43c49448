"""Models as people hold them: one checkpoint file, `.safetensors` or `.gguf`, beside a `base` diffusers directory.

A model site ships a whole SD 1.5/SDXL checkpoint in the original (LDM) layout, an SD3.5/Flux.1/Chroma/Z-Image one
in its maker's layout, or the transformer alone (original or diffusers keys, often fp8), or a GGUF-quantized
transformer. diffusers reads all of them with `from_single_file`, offline only when `config=` names a local diffusers
directory of the family's reference model: that is `base`, which also gives the components the file does not hold.

`inspect` reads only a file's header (the safetensors JSON header, the GGUF tensor table), so the start-up checks can
say which family a file holds, whether it is whole or only the denoiser, and whether it was cut short, without
loading a byte of weights. `load` loads it the way its kind needs.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from producer.errors import ModelError
from worker.settings import HUB_ID

Holds = Literal["pipeline", "denoiser"]

_DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "unet.")
_WHOLE_MARKERS = ("first_stage_model.", "vae.", "conditioner.", "cond_stage_model.", "text_encoders.")
_SD2_MARKER = "cond_stage_model.model."
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class FileProblem(ValueError):
    """Why a checkpoint file cannot be used, as a phrase to put after the model's name."""


@dataclass(frozen=True)
class FileFacts:
    """What a checkpoint file's header says: its format, tensor names, what it holds and which family it is."""

    path: str
    format: Literal["safetensors", "gguf"]
    size: int
    keys: frozenset[str]
    holds: Holds
    family: str | None
    weights: str  # the tensors' storage types, most common first: "bf16", "F8_E4M3", "Q8_0+F32", ...


def inspect(path: str) -> FileFacts:
    """The facts of the checkpoint file at `path`; `FileProblem` when it is missing, unreadable, cut short or not a
    checkpoint. Reads the header only."""
    if os.path.isdir(path):
        raise FileProblem(f"{path} is a directory; give it as `source`, or give the checkpoint file inside it")
    lower = path.lower()
    if not (lower.endswith(".safetensors") or lower.endswith(".gguf")):
        raise FileProblem(
            f"{path} is neither .safetensors nor .gguf: pickled .ckpt/.pt/.bin files can run code when loaded, so "
            "they are not; convert it to safetensors first"
        )
    try:
        size = os.path.getsize(path)
        if lower.endswith(".gguf"):
            keys, types = _gguf_header(path, size)
            form: Literal["safetensors", "gguf"] = "gguf"
        else:
            keys, types = _safetensors_header(path, size)
            form = "safetensors"
    except FileNotFoundError:
        raise FileProblem(f"{path} does not exist") from None
    except PermissionError:
        raise FileProblem(f"{path} cannot be read (permission denied)") from None
    except OSError as exc:
        raise FileProblem(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not keys:
        raise FileProblem(f"{path} holds no tensors")
    holds: Holds = "pipeline" if any(key.startswith(_WHOLE_MARKERS) for key in keys) else "denoiser"
    counted = sorted(set(types), key=lambda t: -types.count(t))
    return FileFacts(path, form, size, frozenset(keys), holds, family_of_keys(keys), "+".join(counted))


def family_of_keys(keys: Iterable[str]) -> str | None:
    """The model family whose checkpoint has these tensor names (original or diffusers layout), or None."""
    names = list(keys)
    tops = {_strip(key).split(".", 1)[0] for key in names}
    if any(key.startswith(_SD2_MARKER) for key in names):
        return None  # SD 2.x: an OpenCLIP text encoder where SD 1.5 has CLIP; no family here runs it
    rules: list[tuple[str, set[str]]] = [
        ("sdxl", {"conditioner", "label_emb", "add_embedding"}),
        ("sd15", {"cond_stage_model", "input_blocks", "time_embedding"}),
        ("sd3", {"joint_blocks", "pos_embed", "text_encoders"}),
        ("chroma", {"distilled_guidance_layer"}),
        ("flux2", {"double_stream_modulation_img", "single_stream_modulation"}),
        ("flux", {"double_blocks", "single_transformer_blocks", "single_blocks"}),
        ("qwen-image", {"img_in"}),
        ("z-image", {"noise_refiner", "context_refiner", "cap_embedder"}),
    ]
    for family, markers in rules:
        if tops & markers:
            return family
    return None


def _strip(key: str) -> str:
    for prefix in _DENOISER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _safetensors_header(path: str, size: int) -> tuple[list[str], list[str]]:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise FileProblem(f"{path} is cut short ({size} bytes; an interrupted download?): download it again")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise FileProblem(f"{path} is not a safetensors file (its first 8 bytes are no header length)")
        raw = handle.read(length)
    if len(raw) < length:
        raise FileProblem(
            f"{path} is cut short ({size} bytes, its header alone says {8 + length}; an interrupted download?): "
            "download it again"
        )
    try:
        header: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise FileProblem(f"{path} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
        types = [str(entry["dtype"]).lower() for entry in header.values()]
    except (TypeError, KeyError, IndexError, ValueError):
        raise FileProblem(f"{path} is not a safetensors file (its header lists no tensors)") from None
    expected = 8 + length + end
    if size < expected:
        raise FileProblem(
            f"{path} is cut short ({size} bytes of the {expected} its header lists; an interrupted download?): "
            "download it again"
        )
    return list(header), types


def _gguf_header(path: str, size: int) -> tuple[list[str], list[str]]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error) as exc:
        # numpy cannot map a tensor that runs past the end of a cut-short file; a damaged table fails the same way
        raise FileProblem(
            f"{path} is not a readable GGUF file, cut short or damaged ({exc}; an interrupted download?): "
            "download it again"
        ) from None
    last = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if size < last:
        raise FileProblem(
            f"{path} is cut short ({size} bytes of the {last} its tensor table lists; an interrupted download?): "
            "download it again"
        )
    return [t.name for t in reader.tensors], [t.tensor_type.name for t in reader.tensors]


# --- loading -------------------------------------------------------------------------------------------------


def denoiser_class(base: str, denoiser: str) -> Any:
    """The diffusers class of `base`'s `denoiser` component, from its model_index.json."""
    import diffusers

    index = config_file(base, "model_index.json")
    if index is None:
        raise ModelError(f"base {base!r} is not a diffusers directory (no model_index.json)")
    entry = json.loads(index.read_text()).get(denoiser)
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise ModelError(f"base {base!r} lists no {denoiser!r} in its model_index.json")
    return getattr(diffusers, entry[1])


def load_denoiser(facts: FileFacts, base: str, denoiser: str, dtype: torch.dtype) -> Any:
    """The transformer or UNet from a denoiser-only file (GGUF quantized, or plain), its config from `base`."""
    from diffusers import GGUFQuantizationConfig

    options: dict[str, Any] = {}
    if facts.format == "gguf":
        options["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    model_class = denoiser_class(base, denoiser)
    return model_class.from_single_file(
        facts.path, config=base, subfolder=denoiser, torch_dtype=dtype, local_files_only=True, **options
    )


def config_file(source: str, filename: str) -> Path | None:
    """`filename` in a local directory `source`, or in the local hub cache's snapshot of hub id `source`."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    if folder.exists() or not HUB_ID.fullmatch(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, filename)
    return Path(cached) if isinstance(cached, str) else None


def describe(facts: FileFacts) -> str:
    """One line for listings: what the file holds and how its weights are stored."""
    return f"{facts.format}, {'whole pipeline' if facts.holds == 'pipeline' else 'denoiser only'}, {facts.weights}"
