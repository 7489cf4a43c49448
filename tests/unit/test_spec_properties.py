"""Property-based tests of the render spec (hypothesis): whatever a producer sends, the spec either
parses into something the worker can run or fails with one `SpecError` line naming a field."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import RenderSpec, SpecError
from producer.keys import check_task_id
from producer.spec import MAX_IMAGES, MAX_SEED, MAX_STEPS

FIELDS = list(RenderSpec.model_fields)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Dicts that look like specs: known field names (and some unknown ones) with arbitrary JSON values.
spec_like = st.dictionaries(st.sampled_from([*FIELDS, "type", "extra", "__class__"]), json_values, max_size=10)


def check_rejection(data: Any) -> None:
    try:
        spec = RenderSpec.parse(data)
    except SpecError as exc:
        message = str(exc)
        assert message.startswith("invalid render spec: ") and "\n" not in message, message
        assert len(message) < 2000, "errors stay readable"
    else:
        assert RenderSpec.parse(spec.model_dump_json()) == spec  # whatever parses is a runnable spec


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(spec_like)
def test_any_spec_like_dict_parses_or_fails_with_one_spec_error_line(data: dict[str, Any]) -> None:
    check_rejection(data)


@settings(max_examples=200)
@given(json_values)
def test_any_json_document_parses_or_fails_with_one_spec_error_line(data: Any) -> None:
    check_rejection(json.dumps(data))


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_fail_with_a_spec_error(data: bytes) -> None:
    check_rejection(data)


cutoff = st.one_of(
    st.builds(lambda r: {"type": "cfg_cutoff", "step_ratio": r}, st.floats(0.01, 1.0)),
    st.builds(lambda i: {"type": "step_budget", "max_steps": i}, st.integers(1, MAX_STEPS)),
    st.builds(lambda every: {"type": "frames", "every": every}, st.integers(1, 4)),
)
valid_specs = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny-sd15", "tiny-sdxl"]),
        "prompt": st.text(min_size=1, max_size=200).filter(lambda p: p.strip() != ""),
        "num_inference_steps": st.integers(4, MAX_STEPS),
        "width": st.integers(8, 256).map(lambda n: n * 8),
        "height": st.integers(8, 256).map(lambda n: n * 8),
        "seed": st.integers(0, MAX_SEED),
        "num_images": st.integers(1, MAX_IMAGES),
        "guidance_scale": st.floats(0.0, 50.0),
        "callbacks": st.lists(cutoff, max_size=3, unique_by=lambda c: c["type"]),
    }
)


@settings(max_examples=200)
@given(valid_specs)
def test_valid_specs_round_trip_exactly_through_json(data: dict[str, Any]) -> None:
    spec = RenderSpec.parse(data)
    again = RenderSpec.parse(spec.model_dump_json())
    assert again == spec and again.model_dump_json() == spec.model_dump_json()
    assert 1 <= spec.denoising_steps <= spec.num_inference_steps


@settings(max_examples=300)
@given(st.text(max_size=140))
def test_task_ids_are_either_safe_path_segments_or_refused(task_id: str) -> None:
    try:
        checked = check_task_id(task_id)
    except SpecError as exc:
        assert str(exc).startswith("task_id: ") and "\n" not in str(exc)
    else:
        assert "/" not in checked and "\\" not in checked and checked not in (".", "..") and not checked.startswith(".")
        assert 1 <= len(checked) <= 128
