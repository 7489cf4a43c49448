"""From a PNG back to a render spec: `render spec-from-png`.

A PNG this farm wrote carries its spec (`render:spec`) and is read back exactly: that spec with the image's own
seed and `num_images: 1`, which renders the same image. Any other PNG is read from the `parameters` text that
AUTOMATIC1111, Forge and ComfyUI's A1111-style savers write: the prompt, a `Negative prompt:` line, and a last
line of `Key: value` pairs; what has no equivalent in a spec is returned as notes. The chunks are read here
without PIL, so the producer stays light.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

from producer.errors import SpecError
from producer.prompt_syntax import PromptSyntaxError, check
from producer.spec import RenderSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL_PLACEHOLDER = "CHANGE-ME"
"""The model of a spec read from a PNG that names none, when no --model is given: no worker serves it."""

# A1111's sampler labels (and ComfyUI's sampler names, and this farm's flow labels) -> the spec's scheduler.
SAMPLER_NAMES: dict[str, str] = {
    "euler": "euler",
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "dpm++ 2m": "dpmpp_2m",
    "dpmpp_2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpmpp_2m_karras": "dpmpp_2m_karras",
    "dpm++ 2m sde karras": "dpmpp_2m_sde_karras",
    "dpmpp_2m_sde_karras": "dpmpp_2m_sde_karras",
    "ddim": "ddim",
    "unipc": "unipc",
    "uni_pc": "unipc",
    "lcm": "lcm",
    "euler (flow)": "flow_euler",
    "euler sde (flow)": "flow_euler_sde",
    "dpm++ 2m (flow)": "dpmpp_2m",
    "unipc (flow)": "unipc",
    "lcm (flow)": "lcm",
}
_PLAIN_SCHEDULES = {"", "automatic", "normal", "simple"}
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^>]*))?>")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_OWN_VERSION = "render-farm"


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, by keyword; the first of a repeated keyword wins."""
    if not data.startswith(PNG_SIGNATURE):
        raise SpecError("not a PNG file (it does not start with the PNG signature); give the PNG the tool saved")
    chunks: dict[str, str] = {}
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        body = data[at + 8 : at + 8 + length]
        at += 12 + length
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or len(body) < length:
            continue
        try:
            key, text = _text_chunk(kind, body)
        except (ValueError, zlib.error):
            continue  # a damaged chunk is skipped, like image viewers do
        chunks.setdefault(key, text)
    return chunks


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    key, _, rest = body.partition(b"\0")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
    compressed, rest = rest[0], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return key.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")


def spec_from_png(data: bytes, *, model: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The spec dict a PNG's metadata describes, and notes (sentences) on what could not be mapped.

    `model` replaces the model the PNG names. Raises `SpecError` when the file is not a PNG or holds no
    generation parameters.
    """
    chunks = png_text_chunks(data)
    parameters = chunks.get("parameters")
    if "render:spec" in chunks:
        spec, notes = _own_spec(chunks["render:spec"], chunks.get("render:index"), parameters)
        if model is not None:
            spec["model"] = model
    elif parameters is not None:
        spec, notes = _from_parameters(parameters, model)
    else:
        found = ", ".join(sorted(chunks)) or "none"
        raise SpecError(
            f"the PNG holds no generation parameters (no 'parameters' or 'render:spec' text chunk; text chunks: "
            f"{found}); it was saved without metadata, or by a tool that writes its own form (a ComfyUI workflow)"
        )
    return spec, notes + _validation_notes(spec)


def _own_spec(spec_json: str, index: str | None, parameters: str | None) -> tuple[dict[str, Any], list[str]]:
    try:
        spec = json.loads(spec_json)
    except json.JSONDecodeError as exc:
        raise SpecError(f"the PNG's render:spec chunk is not JSON ({exc}); the file is damaged") from None
    if not isinstance(spec, dict):
        raise SpecError("the PNG's render:spec chunk is not a JSON object; the file is damaged")
    pairs = _pairs(parameters.strip().split("\n")[-1]) if parameters else {}
    if "Seed" in pairs and pairs["Seed"].isdigit():
        spec["seed"] = int(pairs["Seed"])
    elif isinstance(spec.get("seed"), int) and index is not None and index.isdigit():
        spec["seed"] = spec["seed"] + int(index)  # the job's seed + the image's index, as the worker seeds images
    spec["num_images"] = 1
    return spec, ([] if isinstance(spec.get("seed"), int) else ["Seed: the PNG records no seed; the spec has none"])


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's `parameters` text as its own reader splits it: prompt, negative prompt, and the last line's pairs
    (quoted values unquoted)."""
    lines = text.strip().split("\n")
    pairs: dict[str, str] = {}
    if len(_PAIR.findall(lines[-1])) >= 3:
        pairs = _pairs(lines.pop())
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), pairs


def _pairs(line: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for key, value in _PAIR.findall(line):
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        pairs.setdefault(key.strip(), value.strip())
    return pairs


def _from_parameters(text: str, model: str | None) -> tuple[dict[str, Any], list[str]]:
    prompt, negative, pairs = parse_parameters(text)
    notes: list[str] = []
    own = pairs.get("Version", "").startswith(_OWN_VERSION)
    prompt, loras = _take_loras(prompt, notes)
    if _LORA_TAG.search(negative):
        notes.append("LoRA tags in the negative prompt: A1111 does not apply them either; left in as text")
    spec: dict[str, Any] = {"model": model or pairs.get("Model") or MODEL_PLACEHOLDER, "prompt": prompt}
    if negative:
        spec["negative_prompt"] = negative
    spec["prompt_syntax"] = "plain" if own else "a1111"
    if model is None:
        if "Model" in pairs:
            notes.append(
                f"Model: {pairs['Model']!r} is used as the model name; it must be one of the workers' "
                "(render models): pass --model to choose"
            )
        else:
            notes.append(f"Model: the PNG names none; the spec says {MODEL_PLACEHOLDER!r}: pass --model")
    handled = {"Model"}
    for key, convert in _CONVERTERS.items():
        if key in pairs:
            handled.add(key)
            convert(pairs[key], spec, notes)
    handled |= _scheduler(pairs, spec, notes)
    if loras:
        spec["loras"] = loras
    handled |= _stages(pairs, spec, notes)
    if "Denoising strength" in pairs and "hires" not in spec:
        handled.add("Denoising strength")
        why = "img2img or inpaint, whose input image is not in the PNG"
        notes.append(f"Denoising strength: {pairs['Denoising strength']} ({why}); the spec is text2img")
    for key, value in pairs.items():
        if key not in handled:
            notes.append(f"{key}: {value}")
    return spec, notes


_LATENT_UPSCALERS = ("latent",)  # A1111's "Latent", "Latent (antialiased)", "Latent (bicubic)", ... all start so


def _stages(pairs: dict[str, str], spec: dict[str, Any], notes: list[str]) -> set[str]:
    """A1111's hires fix (`Hires upscale`, `Hires steps`, `Hires upscaler`, `Denoising strength`) as `hires`, and its
    SDXL refiner (`Refiner`, `Refiner switch at`) as `refiner`; the keys it took."""
    taken: set[str] = set()
    if "Hires upscale" in pairs:
        hires: dict[str, Any] = {}
        taken |= {"Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength"} & set(pairs)
        if (scale := _number("Hires upscale", pairs["Hires upscale"], notes, float)) is not None:
            hires["scale"] = scale
        steps = _number("Hires steps", pairs.get("Hires steps", "0"), notes, int)
        if steps:  # A1111's 0: as many as the first pass
            hires["steps"] = steps
        if (
            strength := _number("Denoising strength", pairs.get("Denoising strength", "0.7"), notes, float)
        ) is not None:
            hires["strength"] = strength
        upscaler = pairs.get("Hires upscaler", "Latent")
        if upscaler.lower().startswith(_LATENT_UPSCALERS):
            hires["upscaler"] = "latent"
        else:
            hires["upscaler"] = "lanczos"
            if upscaler.lower() != "lanczos":
                notes.append(f"Hires upscaler: {upscaler} has no equivalent here; used lanczos")
        spec["hires"] = hires
    if "Refiner" in pairs:
        taken |= {"Refiner", "Refiner switch at"} & set(pairs)
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", pairs["Refiner"]).strip()  # A1111 appends the short hash
        refiner: dict[str, Any] = {"model": name}
        if (switch := _number("Refiner switch at", pairs.get("Refiner switch at", "0.8"), notes, float)) is not None:
            refiner["switch_at"] = switch
        spec["refiner"] = refiner
        notes.append(f"Refiner: {name!r} is used as the refiner's model name; it must be one of the workers'")
    return taken


def _take_loras(prompt: str, notes: list[str]) -> tuple[str, list[dict[str, Any]]]:
    loras: list[dict[str, Any]] = []
    for found in _LORA_TAG.finditer(prompt):
        name, scale_text, unet = found.group(1), found.group(2), found.group(3)
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            notes.append(f"LoRA tag {found.group(0)}: its scale is not a number; left out")
            continue
        if unet is not None:
            notes.append(f"LoRA tag {found.group(0)}: a separate UNet scale ({unet}) has no equivalent; used {scale:g}")
        loras.append({"name": name, "scale": scale})
    if loras:
        prompt = _LORA_TAG.sub("", prompt).strip()  # A1111 removes the tags and leaves the text around them
    return prompt, loras


def _number(key: str, value: str, notes: list[str], kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(value)
    except ValueError:
        notes.append(f"{key}: {value!r} is not a number; left at the spec's default")
        return None


def _steps(value: str, spec: dict[str, Any], notes: list[str]) -> None:
    if (steps := _number("Steps", value, notes, int)) is not None:
        spec["num_inference_steps"] = steps


def _cfg(value: str, spec: dict[str, Any], notes: list[str]) -> None:
    if (scale := _number("CFG scale", value, notes, float)) is not None:
        spec["guidance_scale"] = scale


def _seed(value: str, spec: dict[str, Any], notes: list[str]) -> None:
    if (seed := _number("Seed", value, notes, int)) is not None:
        spec["seed"] = seed


def _size(value: str, spec: dict[str, Any], notes: list[str]) -> None:
    if found := _SIZE.match(value):
        spec["width"], spec["height"] = int(found.group(1)), int(found.group(2))
    else:
        notes.append(f"Size: {value!r} is not WIDTHxHEIGHT; left at the spec's default")


def _clip_skip(value: str, spec: dict[str, Any], notes: list[str]) -> None:
    if (layers := _number("Clip skip", value, notes, int)) is not None:
        if layers < 1:
            notes.append(f"Clip skip: {layers} (A1111 counts from 1); left at 0")
        else:
            spec["clip_skip"] = layers - 1  # A1111 counts the last layer as 1, diffusers as 0


_CONVERTERS = {"Steps": _steps, "CFG scale": _cfg, "Seed": _seed, "Size": _size, "Clip skip": _clip_skip}


def _scheduler(pairs: dict[str, str], spec: dict[str, Any], notes: list[str]) -> set[str]:
    """Sampler plus new A1111's `Schedule type` (or ComfyUI's `Scheduler`) -> the spec's scheduler."""
    sampler = pairs.get("Sampler")
    schedule_key = "Schedule type" if "Schedule type" in pairs else "Scheduler"
    schedule = pairs.get(schedule_key, "")
    handled = {"Sampler", schedule_key} if schedule else {"Sampler"}
    if sampler is None:
        return handled
    base = sampler.strip().lower()
    kind = schedule.strip().lower()
    if kind in _PLAIN_SCHEDULES:
        name = SAMPLER_NAMES.get(base)
    else:
        name = SAMPLER_NAMES.get(f"{base} {kind}") or SAMPLER_NAMES.get(f"{base}_{kind}")
        if name is None and (name := SAMPLER_NAMES.get(base)) is not None:
            notes.append(f"{schedule_key}: {schedule} has no equivalent with {sampler}; the sampler's own schedule")
    if name is None:
        shown = f"{sampler} with {schedule_key} {schedule}" if schedule else sampler
        notes.append(f"Sampler: {shown} has no equivalent here; scheduler left at the checkpoint's default")
    else:
        spec["scheduler"] = name
    return handled


def _validation_notes(spec: dict[str, Any]) -> list[str]:
    """Why the spec does not validate yet, if it does not (the user edits it before submitting). The prompts are
    checked here first: the spec's own check of them runs only once every field is valid."""
    notes: list[str] = []
    data = dict(spec)
    syntax = data.pop("prompt_syntax", "plain")
    if syntax == "a1111":
        for field in ("prompt", "negative_prompt"):
            try:
                check(str(data.get(field, "")), field=field)
            except PromptSyntaxError as exc:
                notes.append(f"the spec is not valid yet: {exc}")
    if "prompt_syntax" in RenderSpec.model_fields and not notes:
        data["prompt_syntax"] = syntax
    try:
        RenderSpec.parse(data)
    except SpecError as exc:
        notes.append(f"the spec is not valid yet ({exc}); edit it before submitting")
    return notes
