"""`render spec-from-png`: this farm's PNGs back to the spec that renders them again, byte for byte; A1111's,
Forge's and ComfyUI's `parameters` text (written here into real PNG chunks with PIL) mapped into a spec."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from producer import RenderSpec, SpecError
from producer.png_params import MODEL_PLACEHOLDER, parse_parameters, png_text_chunks, spec_from_png
from tests.helpers import render_cli, render_here
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models.registry import ModelRegistry
from worker.storage import LocalStorage


def png(texts: dict[str, str], *, compressed: bool = False) -> bytes:
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value, zip=compressed)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


A1111 = (
    "masterpiece, (best quality:1.2), a lighthouse <lora:add_detail:0.6>, [day:night:0.5]\n"
    "at dusk, BREAK stormy sea\n"
    "Negative prompt: lowres, (bad hands:1.3)\n"
    "blurry\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3215402201, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54", '
    "Version: v1.10.1"
)


def test_an_a1111_png_maps_to_a_spec_and_notes_the_rest() -> None:
    spec, notes = spec_from_png(png({"parameters": A1111}), model="tiny-sd15")
    assert spec == {
        "model": "tiny-sd15",
        "prompt": "masterpiece, (best quality:1.2), a lighthouse , [day:night:0.5]\nat dusk, BREAK stormy sea",
        "negative_prompt": "lowres, (bad hands:1.3)\nblurry",
        "prompt_syntax": "a1111",
        "num_inference_steps": 28,
        "guidance_scale": 6.5,
        "seed": 3215402201,
        "width": 512,
        "height": 768,
        "clip_skip": 1,
        "scheduler": "dpmpp_2m_karras",
        "loras": [{"name": "add_detail", "scale": 0.6}],
    }
    assert notes == [
        "Model hash: 6ce0161689",
        "Lora hashes: add_detail: 7c6bad76eb54",  # the quoted value, commas and all, unquoted
        "Version: v1.10.1",
    ]
    _valid(spec)


def _valid(spec: dict[str, Any]) -> RenderSpec:
    """The spec validates (without prompt_syntax while producer/spec.py has no such field yet)."""
    data = dict(spec)
    if "prompt_syntax" not in RenderSpec.model_fields:
        data.pop("prompt_syntax")
    return RenderSpec.parse(data)


def test_without_model_the_png_s_model_is_used_and_noted() -> None:
    spec, notes = spec_from_png(png({"parameters": A1111}))
    assert spec["model"] == "v1-5-pruned-emaonly"
    assert notes[0] == (
        "Model: 'v1-5-pruned-emaonly' is used as the model name; it must be one of the workers' (render models): "
        "pass --model to choose"
    )
    nameless = A1111.replace("Model: v1-5-pruned-emaonly, ", "")
    spec, notes = spec_from_png(png({"parameters": nameless}))
    assert spec["model"] == MODEL_PLACEHOLDER
    assert notes[0] == f"Model: the PNG names none; the spec says {MODEL_PLACEHOLDER!r}: pass --model"


@pytest.mark.parametrize(
    ("pairs", "scheduler", "note"),
    [
        ("Sampler: Euler a", "euler_a", None),
        ("Sampler: DPM++ 2M Karras", "dpmpp_2m_karras", None),  # A1111 before 1.9 named the schedule in the sampler
        ("Sampler: DPM++ 2M SDE, Schedule type: Karras", "dpmpp_2m_sde_karras", None),
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m", None),
        ("Sampler: UniPC, Schedule type: Uniform", "unipc", "Schedule type: Uniform has no equivalent with UniPC"),
        ("Sampler: euler_ancestral, Scheduler: normal", "euler_a", None),  # ComfyUI's names
        ("Sampler: dpmpp_2m_sde, Scheduler: karras", "dpmpp_2m_sde_karras", None),
        ("Sampler: Euler (flow)", "flow_euler", None),  # this farm's flow labels
        ("Sampler: Euler a, Schedule type: Karras", "euler_a", "Schedule type: Karras has no equivalent with Euler a"),
        ("Sampler: DPM++ SDE", None, "Sampler: DPM++ SDE has no equivalent here"),
        ("Sampler: Euler, Schedule type: Exponential", "euler", "Schedule type: Exponential has no equivalent"),
    ],
)
def test_samplers_map_to_the_spec_s_scheduler_names(pairs: str, scheduler: str | None, note: str | None) -> None:
    text = f"a cat\nSteps: 20, {pairs}, CFG scale: 7, Seed: 1, Size: 512x512, Model: m"
    spec, notes = spec_from_png(png({"parameters": text}), model="tiny-sd15")
    assert spec.get("scheduler") == scheduler
    assert [n for n in notes if note and n.startswith(note)] == ([] if note is None else [notes[0]])
    if note is None:
        assert notes == []
    assert _valid(spec).scheduler == (scheduler or "default")


def test_forge_and_comfyui_forms() -> None:
    forge = (
        "a (red:1.1) fox in snow\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, "
        "Distilled CFG Scale: 3.5, Seed: 42, Size: 896x1152, Model hash: abc, Model: flux1-dev, "
        "Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: ae"
    )
    spec, notes = spec_from_png(png({"parameters": forge}), model="tiny-flux")
    assert (spec["scheduler"], spec["guidance_scale"], spec["width"], spec["height"]) == ("euler", 1.0, 896, 1152)
    assert notes == [
        "Distilled CFG Scale: 3.5",
        "Model hash: abc",
        "Version: f2.0.1v1.10.1-previous-313-g8a042934",
        "Module 1: ae",
    ]
    comfy = (
        "portrait, (freckles:1.2)\nNegative prompt: blurry\nSteps: 25, Sampler: dpmpp_2m, Scheduler: karras, "
        "CFG scale: 5.5, Seed: 7, Size: 832x1216, Model: sdxl_base, Version: ComfyUI"
    )
    spec, notes = spec_from_png(png({"parameters": comfy, "prompt": "{}", "workflow": "{}"}))
    assert spec["scheduler"] == "dpmpp_2m_karras" and spec["negative_prompt"] == "blurry"
    assert spec["model"] == "sdxl_base" and spec["prompt_syntax"] == "a1111"
    assert notes[1:] == ["Version: ComfyUI"]


def test_hires_and_refiner_map_to_stages_and_img2img_and_unknown_keys_are_notes() -> None:
    text = (
        "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model: m, Denoising strength: 0.45, "
        "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Variation seed: 5"
    )
    spec, notes = spec_from_png(png({"parameters": text}), model="tiny-sd15")
    assert "strength" not in spec and "pipeline" not in spec
    assert spec["hires"] == {"scale": 2.0, "steps": 10, "strength": 0.45, "upscaler": "latent"}
    assert notes == ["Variation seed: 5"]
    assert RenderSpec.parse(spec).hires is not None
    esrgan = text.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+").replace(
        "Hires steps: 10", "Hires steps: 0"
    )
    spec, notes = spec_from_png(png({"parameters": esrgan}), model="tiny-sd15")
    assert spec["hires"] == {"scale": 2.0, "strength": 0.45, "upscaler": "lanczos"}
    assert notes == ["Hires upscaler: R-ESRGAN 4x+ has no equivalent here; used lanczos", "Variation seed: 5"]
    refined = (
        "a cat\nSteps: 30, Seed: 1, Size: 1024x1024, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8"
    )
    spec, notes = spec_from_png(png({"parameters": refined}), model="tiny-sdxl")
    assert spec["refiner"] == {"model": "sd_xl_refiner_1.0", "switch_at": 0.8}
    assert notes == ["Refiner: 'sd_xl_refiner_1.0' is used as the refiner's model name; it must be one of the workers'"]
    img2img = text.split(", Hires")[0]
    _, notes = spec_from_png(png({"parameters": img2img}), model="tiny-sd15")
    assert notes == [
        "Denoising strength: 0.45 (img2img or inpaint, whose input image is not in the PNG); the spec is text2img"
    ]


def test_non_latin_and_compressed_chunks_are_read() -> None:
    text = "灯台 (夕暮れ:1.2)\nSteps: 12, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Model: m"
    for compressed in (False, True):
        data = png({"parameters": text}, compressed=compressed)
        assert png_text_chunks(data)["parameters"] == text
        spec, _ = spec_from_png(data)
        assert spec["prompt"] == "灯台 (夕暮れ:1.2)"
    latin = png({"parameters": "café\nSteps: 1, Seed: 2, Size: 64x64"}, compressed=True)  # zTXt
    assert spec_from_png(latin)[0]["prompt"] == "café"


def test_a_prompt_a1111_tolerates_but_the_spec_refuses_is_noted() -> None:
    text = "(masterpiece, best quality, a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 510x512"
    spec, notes = spec_from_png(png({"parameters": text}), model="tiny-sd15")
    assert spec["prompt"] == "(masterpiece, best quality, a cat"
    problems = [n for n in notes if n.startswith("the spec is not valid yet")]
    assert any("prompt: position 0: unclosed '('" in n for n in problems), notes
    assert any("width: must be a multiple of 8" in n for n in problems), notes


def test_parameters_without_a_pairs_line_are_all_prompt() -> None:
    assert parse_parameters("just a prompt\nsecond line") == ("just a prompt\nsecond line", "", {})
    assert parse_parameters("p\nNegative prompt: n\nSteps: 3, Seed: 4, Size: 8x8") == (
        "p",
        "n",
        {"Steps": "3", "Seed": "4", "Size": "8x8"},
    )


def test_a_png_without_parameters_or_not_a_png_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"no generation parameters .* text chunks: Software"):
        spec_from_png(png({"Software": "paint"}))
    with pytest.raises(SpecError, match="text chunks: none"):
        spec_from_png(png({}))
    with pytest.raises(SpecError, match="not a PNG file"):
        spec_from_png(b"GIF89a...")


# This farm's own PNGs: the spec comes back exactly, and renders the same image again.


def _render(registry: ModelRegistry, spec: RenderSpec, root: Path, task_id: str) -> list[bytes]:
    storage = LocalStorage(root)
    manifest = render(JobContext(spec, task_id=task_id), registry=registry, storage=storage)
    assert manifest.status == "succeeded", manifest.error
    return [storage.get(url.removeprefix(storage.base_url + "/")) or b"" for url in manifest.images]


def test_a_farm_png_gives_back_the_spec_that_renders_the_same_bytes(registry: ModelRegistry, tmp_path: Path) -> None:
    original = RenderSpec.parse(
        {
            "model": "tiny-sd15",
            "prompt": "a lighthouse at dusk",
            "negative_prompt": "fog",
            "num_inference_steps": 4,
            "width": 64,
            "height": 64,
            "seed": 1234,
            "scheduler": "euler_a",
            "guidance_scale": 6.0,
        }
    )
    (first,) = _render(registry, original, tmp_path / "a", "job-1")
    spec, notes = spec_from_png(first)
    assert notes == []
    assert spec == original.model_dump(mode="json")
    (again,) = _render(registry, RenderSpec.parse(spec), tmp_path / "b", "job-1")
    assert again == first

    # Image 1 of a two-image job: its own seed (the job's + 1), one image; the same pixels again.
    pair = _render(registry, original.model_copy(update={"num_images": 2}), tmp_path / "c", "job-2")
    spec, notes = spec_from_png(pair[1])
    assert notes == []
    assert spec == {**original.model_dump(mode="json"), "seed": 1235, "num_images": 1}
    (alone,) = _render(registry, RenderSpec.parse(spec), tmp_path / "d", "job-3")
    assert _pixels(alone) == _pixels(pair[1])
    assert _pixels(alone) != _pixels(pair[0])


def _pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_a_farm_png_stripped_of_its_spec_maps_from_its_parameters(registry: ModelRegistry, tmp_path: Path) -> None:
    original = RenderSpec.parse(
        {
            "model": "tiny-sd15",
            "prompt": "a lighthouse",
            "num_inference_steps": 3,
            "width": 64,
            "height": 64,
            "seed": 99,
            "scheduler": "dpmpp_2m_karras",
            "clip_skip": 1,
        }
    )
    (data,) = _render(registry, original, tmp_path, "job-4")
    texts = png_text_chunks(data)
    spec, notes = spec_from_png(png({"parameters": texts["parameters"]}))
    assert spec == {
        "model": "tiny-sd15",
        "prompt": "a lighthouse",
        "prompt_syntax": "plain",
        "num_inference_steps": 3,
        "guidance_scale": 7.5,
        "seed": 99,
        "width": 64,
        "height": 64,
        "clip_skip": 1,
        "scheduler": "dpmpp_2m_karras",
    }
    assert notes[0].startswith("Model: 'tiny-sd15' is used as the model name")
    assert [n.split(":")[0] for n in notes[1:]] == ["Version"]
    assert _valid(spec) == original


# The command.


def test_the_command_prints_the_spec_and_the_notes(tmp_path: Path) -> None:
    path = tmp_path / "a1111.png"
    path.write_bytes(png({"parameters": A1111}))
    result = render_cli("spec-from-png", str(path), "--model", "tiny-sd15")  # the entry point, as a process
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert spec["model"] == "tiny-sd15" and spec["scheduler"] == "dpmpp_2m_karras"
    assert result.stdout == json.dumps(spec, indent=2) + "\n"
    assert result.stderr.splitlines() == [
        "not mapped: Model hash: 6ce0161689",
        "not mapped: Lora hashes: add_detail: 7c6bad76eb54",
        "not mapped: Version: v1.10.1",
    ]


def test_the_command_fails_on_a_png_without_parameters(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    path.write_bytes(png({}))
    result = render_here("spec-from-png", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: {path}: the PNG holds no generation parameters")
    missing = render_here("spec-from-png", str(tmp_path / "missing.png"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
