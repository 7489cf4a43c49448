"""The `render` command: as a real process where the process matters (the entry point, settings read at start,
Redis), and through the same entry point in this process where a render's own work is what is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import render_cli as run
from tests.helpers import render_here as here
from worker.settings import default_models

ROOT = Path(__file__).parents[2]


def test_schema_prints_the_spec_json_schema() -> None:
    result = run("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "RenderSpec" and "callbacks" in schema["properties"]


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "examples").glob("*.json") if not p.name.startswith("bad-"))
)
def test_local_renders_an_example_into_a_directory(tmp_path: Path, example: str) -> None:
    command = run if example == "text2img-sd15.json" else here  # one as a real process: the entry point itself
    result = command("local", f"examples/{example}", "--storage", tmp_path.as_uri(), "--task-id", "cli-job")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["task_id"] == "cli-job" and manifest["status"] in ("succeeded", "interrupted")
    for url in manifest["images"] + manifest["frames"]:
        assert Path(url.removeprefix("file://")).is_file()
    assert json.loads((tmp_path / "cli-job" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    ("example", "family", "sampler"),
    [("text2img-flux.json", "flux", "Euler (flow)"), ("text2img-sd3.json", "sd3", "DPM++ 2M (flow)")],
)
def test_the_flux_and_sd3_examples_name_their_family_and_sampler(
    tmp_path: Path, example: str, family: str, sampler: str
) -> None:
    result = here("local", f"examples/{example}", "--storage", tmp_path.as_uri())
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert (manifest["family"], manifest["scheduler"]["label"]) == (family, sampler)


def test_a_cfg_cutoff_on_a_distilled_flux_model_is_one_line_naming_the_callback(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"model": "tiny-flux", "prompt": "x", "callbacks": [{"type": "cfg_cutoff", "step_ratio": 0.5}]})
    )
    result = here("local", str(spec), "--storage", tmp_path.as_uri())
    assert result.returncode == 2
    assert result.stderr == (
        "error: callbacks[0]: 'tiny-flux' (flux) has distilled guidance; there is no unconditional pass to cut: "
        "remove the cfg_cutoff (or guide by a negative prompt with true_cfg_scale > 1)\n"
    )


def test_storage_defaults_to_the_setting(tmp_path: Path) -> None:
    result = here("local", "examples/text2img-sd15.json", env={"RENDER_STORAGE_URL": tmp_path.as_uri()})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"][0].startswith(tmp_path.as_uri())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["local", "examples/bad-spec.json"], "error: invalid render spec: width: must be a multiple of 8"),
        (["local", "no-such-spec.json"], "error: cannot read spec file 'no-such-spec.json': No such file"),
        (["local", "examples/text2img-sd15.json", "--storage", "ftp://x"], "error: storage URL 'ftp://x' has an"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_model_outside_the_allowlist_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "sdxl-turbo", "prompt": "x", "width": 64, "height": 64}))
    result = here("local", str(spec), "--storage", tmp_path.as_uri())
    assert result.returncode == 2
    allowed = ", ".join(sorted(default_models()))
    assert result.stderr == (
        f"error: model 'sdxl-turbo' is not on this worker's allowlist; use one of: {allowed} "
        "(or add it to RENDER_MODELS)\n"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RENDER_MODELS": "not json"}, "error: RENDER_MODELS is not valid JSON"),
        (
            {"RENDER_MODELS": '{"x": {"family": "sd4", "source": "tiny"}}'},
            "error: invalid setting: RENDER_MODELS (x.family)",
        ),
        ({"RENDER_MAX_CACHED_MODELS": "0"}, "error: invalid setting: RENDER_MAX_CACHED_MODELS: "),
    ],
)
def test_bad_setting_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    result = run("local", "examples/text2img-sd15.json", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_the_lora_example_records_its_sampler_and_lora_and_the_lora_changes_the_pixels(tmp_path: Path) -> None:
    from PIL import Image

    result = here("local", "examples/lora-sd15.json", "--storage", tmp_path.as_uri(), "--task-id", "with-lora")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["status"] == "succeeded"
    assert manifest["scheduler"]["name"] == "dpmpp_2m_karras" and manifest["scheduler"]["label"] == "DPM++ 2M Karras"
    assert manifest["scheduler"]["diffusers_class"] == "DPMSolverMultistepScheduler"
    assert [(lo["name"], lo["scale"]) for lo in manifest["loras"]] == [("tiny-lora", 0.8)]
    assert len(manifest["loras"][0]["sha256"]) == 64
    image = Image.open(tmp_path / "with-lora" / "image-0.png")
    assert "<lora:tiny-lora:0.8>" in image.info["parameters"] and "Sampler: DPM++ 2M Karras" in image.info["parameters"]

    without = {k: v for k, v in json.loads((ROOT / "examples/lora-sd15.json").read_text()).items() if k != "loras"}
    (tmp_path / "no-lora.json").write_text(json.dumps(without))
    result = here("local", str(tmp_path / "no-lora.json"), "--storage", tmp_path.as_uri(), "--task-id", "no-lora")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["loras"] == []
    plain = Image.open(tmp_path / "no-lora" / "image-0.png")
    assert plain.tobytes() != image.tobytes()


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"scheduler": "dpm++"}, "error: invalid render spec: scheduler: must be 'default', 'euler', "),
        ({"loras": [{"name": "no-such-lora"}]}, "error: loras[0].name: 'no-such-lora' is not on this worker's "),
    ],
)
def test_a_bad_scheduler_or_lora_name_is_one_line_naming_the_field(
    tmp_path: Path, field: dict[str, object], message: str
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "tiny-sd15", "prompt": "x", "width": 64, "height": 64, **field}))
    result = here("local", str(spec), "--storage", tmp_path.as_uri())
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("task_id", ["", " ", "\t"])
def test_an_empty_or_blank_task_id_is_refused_not_replaced(tmp_path: Path, task_id: str) -> None:
    result = here("local", "examples/text2img-sd15.json", "--storage", tmp_path.as_uri(), "--task-id", task_id)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: task_id: {task_id!r} is not a valid task id;"), result.stderr
    assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())


def test_submit_refuses_an_empty_task_id_before_reaching_redis() -> None:
    result = run(
        "submit", "examples/text2img-sd15.json", "--task-id", "", env={"RENDER_REDIS_URL": "redis://127.0.0.1:9/0"}
    )
    assert result.returncode == 2
    assert (
        result.stderr == "error: task_id: '' is not a valid task id; use 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit (or leave it out for a generated one)\n"
    )


def test_submit_refuses_more_steps_than_the_sampler_runs_before_anything_is_queued(tmp_path: Path) -> None:
    spec = tmp_path / "lcm.json"
    spec.write_text(json.dumps({"model": "tiny-sd15", "prompt": "x", "scheduler": "lcm", "num_inference_steps": 51}))
    result = here("submit", str(spec), env={"RENDER_REDIS_URL": "redis://127.0.0.1:9/0"})  # no Redis there
    assert result.returncode == 2
    assert result.stderr == (
        "error: invalid render spec: num_inference_steps must be at most 50 with scheduler 'lcm'; got 51\n"
    )
    assert result.stdout == ""
