"""The render spec: every bad input is a SpecError that names the field; good specs round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from producer import CfgCutoff, Frames, RenderSpec, SpecError, StepBudget


def spec(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny-sd15", "prompt": "a lighthouse", "num_inference_steps": 10, **overrides}


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        (spec(colour="red"), "colour", "unknown field"),
        (spec(callbacks=[{"type": "frames", "every": 2, "fps": 3}]), "callbacks[0].fps", "unknown field"),
        (spec(callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.4, "step_index": 3}]), "callbacks[0]", "exactly one"),
        (spec(callbacks=[{"type": "cfg_cutoff"}]), "callbacks[0]", "exactly one"),
        (spec(callbacks=[{"type": "ip_adapter_scale_cutoff"}]), "callbacks[0]", "exactly one"),
        (spec(callbacks=[{"type": "cfg_cutoff", "step_index": 10}]), "callbacks[0].step_index", "less than"),
        (spec(callbacks=[{"type": "cfg_cutoff", "step_index": -1}]), "callbacks[0].step_index", "greater than"),
        (spec(callbacks=[{"type": "cfg_cutoff", "step_ratio": 0}]), "callbacks[0].step_ratio", "greater than"),
        (spec(callbacks=[{"type": "cfg_cutoff", "step_ratio": 1.5}]), "callbacks[0].step_ratio", "less than"),
        (spec(callbacks=[{"type": "step_budget"}]), "callbacks[0]", "max_steps, max_seconds or both"),
        (spec(callbacks=[{"type": "step_budget", "max_seconds": 0}]), "callbacks[0].max_seconds", "greater than"),
        (spec(callbacks=[{"type": "frames", "every": 11}]), "callbacks[0].every", "at most num_inference_steps"),
        (spec(callbacks=[{"type": "frames", "format": "gif"}]), "callbacks[0].format", "'png', 'webp' or 'jpeg'"),
        (spec(callbacks=[{"type": "sharpen"}]), "callbacks[0]", "does not match"),
        (spec(callbacks=[{"type": "frames"}, {"type": "frames"}]), "callbacks[1]", "only one frames"),
        (spec(width=100), "width", "multiple of 8"),
        (spec(height=516), "height", "try 512"),
        (spec(width=32), "width", "greater than or equal to 64"),
        (spec(num_inference_steps=0), "num_inference_steps", "greater than or equal to 1"),
        (spec(num_inference_steps=151), "num_inference_steps", "less than or equal to 150"),
        (spec(scheduler="lcm", num_inference_steps=51), "num_inference_steps", "at most 50 with scheduler 'lcm'"),
        (spec(num_images=9), "num_images", "less than or equal to 8"),
        (spec(num_images=0), "num_images", "greater than or equal to 1"),
        (spec(prompt=""), "prompt", "at least 1 character"),
        (spec(prompt="   \n"), "prompt", "not only whitespace"),
        (spec(guidance_scale=float("nan")), "guidance_scale", "finite"),
        (spec(guidance_scale=float("inf")), "guidance_scale", "finite"),
        (spec(guidance_scale=-1), "guidance_scale", "greater than or equal to 0"),
        (spec(seed=-5), "seed", "greater than or equal to 0"),
        (spec(pipeline="video"), "pipeline", "'text2img'"),
        (spec(spec_version=2), "spec_version", "1"),
        ({"prompt": "x"}, "model", "Field required"),
        (spec(num_inference_steps="ten"), "num_inference_steps", "valid integer"),
        (spec(prompt="a (red fox", prompt_syntax="a1111"), "prompt", "position 2"),
        (spec(negative_prompt="[a|b]", prompt_syntax="a1111"), "negative_prompt", "position"),
        (spec(prompt_syntax="comfy"), "prompt_syntax", "'plain' or 'a1111'"),
        (spec(guidance={"from": 7}), "guidance.ramp.to", "Field required"),
        (spec(guidance={"from": 7, "to": 51}), "guidance.ramp.to", "less than or equal to 50"),
        (spec(guidance=[[0.5, 7], [0.2, 3]]), "guidance", "increasing t"),
        (spec(guidance=[[0, 7]]), "guidance.points", "at least 2"),
    ],
)
def test_bad_input_names_the_field(data: dict[str, Any], field: str, hint: str) -> None:
    with pytest.raises(SpecError) as caught:
        RenderSpec.parse(data)
    message = str(caught.value)
    assert message.startswith("invalid render spec: ")
    assert f"{field}:" in message or f"{field} " in message, message
    assert hint in message, message
    assert "\n" not in message


def test_the_sampler_step_limit_is_one_sentence_naming_the_limit() -> None:
    with pytest.raises(SpecError) as caught:
        RenderSpec.parse(spec(scheduler="lcm", num_inference_steps=51))
    assert str(caught.value) == (
        "invalid render spec: num_inference_steps must be at most 50 with scheduler 'lcm'; got 51"
    )
    assert RenderSpec.parse(spec(scheduler="lcm", num_inference_steps=50)).num_inference_steps == 50


def test_plain_prompts_keep_brackets_as_text() -> None:
    assert RenderSpec.parse(spec(prompt="a (red fox")).prompt == "a (red fox"


def test_nan_in_json_text_is_rejected() -> None:
    with pytest.raises(SpecError, match="guidance_scale: must be a finite number"):
        RenderSpec.parse('{"model": "m", "prompt": "p", "guidance_scale": NaN}')


def test_malformed_json_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="Invalid JSON"):
        RenderSpec.parse('{"model": "m", "prompt": ')


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as caught:
        RenderSpec.parse(spec(width=100, num_images=20))
    assert "width:" in str(caught.value) and "num_images:" in str(caught.value)


def test_round_trip_through_json() -> None:
    original = RenderSpec.parse(
        spec(
            negative_prompt="blurry",
            seed=2**63 - 1,
            num_images=3,
            ip_adapter={"image": "s3://bucket/style.png", "scale": 0.5},
            callbacks=[
                {"type": "cfg_cutoff", "step_index": 4},
                {"type": "step_budget", "max_steps": 6, "max_seconds": 2.5},
                {"type": "frames", "every": 2, "format": "webp", "size": 64},
                {"type": "ip_adapter_scale_cutoff", "step_ratio": 0.5},
            ],
        )
    )
    again = RenderSpec.parse(original.model_dump_json())
    assert again == original
    assert again.callback(CfgCutoff) == CfgCutoff(type="cfg_cutoff", step_index=4)
    assert again.callback(StepBudget) is not None and again.callback(StepBudget).max_seconds == 2.5  # type: ignore[union-attr]
    assert again.callback(Frames) is not None and again.callback(Frames).format == "webp"  # type: ignore[union-attr]


def test_defaults() -> None:
    parsed = RenderSpec.parse({"model": "tiny-sd15", "prompt": "p"})
    assert (parsed.pipeline, parsed.num_inference_steps, parsed.width, parsed.height) == ("text2img", 30, 512, 512)
    assert parsed.seed is None and parsed.num_images == 1 and parsed.callbacks == []


@pytest.mark.parametrize(("ratio", "steps", "expected"), [(0.4, 10, 4), (0.5, 7, 3), (1.0, 10, 10), (0.01, 10, 0)])
def test_cutoff_step_follows_diffusers_rule(ratio: float, steps: int, expected: int) -> None:
    assert CfgCutoff(type="cfg_cutoff", step_ratio=ratio).cutoff_step(steps) == expected


def test_schema_is_exportable_and_strict() -> None:
    schema = RenderSpec.model_json_schema()
    assert schema["additionalProperties"] is False
    assert {"model", "prompt", "callbacks", "num_inference_steps"} <= set(schema["properties"])
    tags = {name for name in schema["$defs"]}
    assert {"CfgCutoff", "StepBudget", "Frames", "IpAdapterScaleCutoff"} <= tags


def test_producer_imports_no_torch() -> None:
    code = (
        "import sys, producer, producer.client, producer.settings; "
        "assert not {'torch', 'diffusers', 'worker', 'boto3'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_examples_are_valid_specs() -> None:
    from pathlib import Path

    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.json"))
    good = [p for p in examples if not p.name.startswith("bad-")]
    assert good, "examples/ has no spec"
    for path in good:
        RenderSpec.parse(path.read_bytes())
    for path in examples:
        if path.name.startswith("bad-"):
            with pytest.raises(SpecError):
                RenderSpec.parse(json.loads(path.read_text()))
