"""Start-up checks (`worker.process.preflight`): a setting that cannot work is one ConfigError naming it, before any
job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from producer.errors import ConfigError
from worker.models import tiny_sd15
from worker.models.loras import tiny_state_dict
from worker.process.preflight import (
    PROBE_PREFIX,
    check_compile_cache,
    check_loras,
    check_models,
    check_storage,
    check_worker,
)
from worker.settings import LoraSource, ModelSource, WorkerSettings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real diffusers directory, saved from the tiny SD 1.5 pipeline."""
    folder = tmp_path_factory.mktemp("checkpoint") / "sd15"
    tiny_sd15.build().save_pretrained(folder)
    return folder


def settings(tmp_path: Path, **overrides: object) -> WorkerSettings:
    return WorkerSettings(storage_url=(tmp_path / "out").as_uri(), device="cpu", **overrides)  # type: ignore[arg-type]


def test_the_defaults_and_a_saved_checkpoint_pass(tmp_path: Path, checkpoint: Path) -> None:
    models = {
        "tiny-sd15": ModelSource(family="sd15", source="tiny"),
        "real": ModelSource(family="sd15", source=str(checkpoint)),
    }
    check_worker(settings(tmp_path, models=models))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(PROBE_PREFIX)], "the probe was left"


@pytest.mark.parametrize("source", ["/nonexistent/models/sd15", "stabilityai/not-in-the-cache", "relative/not/there"])
def test_a_model_source_that_is_not_there_is_refused(source: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_models({"real": ModelSource(family="sd15", source=source)})
    assert str(refused.value) == (
        f"RENDER_MODELS: model 'real': '{source}' is neither a diffusers directory (with model_index.json) nor a hub "
        "id in the local cache; fix the entry in RENDER_MODELS or remove it"
    )


def test_a_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="with model_index.json"):
        check_models({"real": ModelSource(family="sd15", source=str(tmp_path))})


def test_a_model_of_another_family_is_refused(checkpoint: Path) -> None:
    with pytest.raises(
        ConfigError, match='says "family": "sdxl" but .* holds a StableDiffusionPipeline; set "family" to "sd15"'
    ):
        check_models({"real": ModelSource(family="sdxl", source=str(checkpoint))})


def test_an_incomplete_download_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_bytes((checkpoint / "model_index.json").read_bytes())
    with pytest.raises(ConfigError, match="lists '.*' but .* is missing \\(an incomplete download\\?\\)"):
        check_models({"real": ModelSource(family="sd15", source=str(partial))})


def test_an_unreadable_model_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model_index.json cannot be read"):
        check_models({"real": ModelSource(family="sd15", source=str(tmp_path))})


def test_missing_adapter_parts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="controlnet '/nowhere/cn' is neither a directory with config.json"):
        check_models({"m": ModelSource(family="sd15", source="tiny", controlnet="/nowhere/cn")})
    with pytest.raises(ConfigError, match="ip_adapter '/nowhere/ip.safetensors' is not a file"):
        check_models({"m": ModelSource(family="sd15", source="tiny", ip_adapter="/nowhere/ip.safetensors")})
    with pytest.raises(ConfigError, match="image_encoder .* is not a directory with config.json"):
        check_models({"m": ModelSource(family="sd15", source="tiny", image_encoder=str(tmp_path))})


def test_lora_files_are_checked(tmp_path: Path) -> None:
    import safetensors.torch

    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(tiny_state_dict(tiny_sd15.build()), good)
    check_loras({"good": LoraSource(family="sd15", path=str(good)), "tiny-lora": LoraSource(path="tiny")})
    with pytest.raises(
        ConfigError, match="^RENDER_LORAS: LoRA 'gone': .*gone.safetensors does not exist; fix its path"
    ):
        check_loras({"gone": LoraSource(family="sd15", path=str(tmp_path / "gone.safetensors"))})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        check_loras({"junk": LoraSource(family="sd15", path=str(tmp_path / "junk.safetensors"))})


def test_a_device_that_is_not_there_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^RENDER_DEVICE='bogus'"):
        check_worker(settings(tmp_path).model_copy(update={"device": "bogus"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^RENDER_DEVICE='cuda': .*no CUDA device is visible"):
            check_worker(settings(tmp_path).model_copy(update={"device": "cuda"}))


def test_a_storage_directory_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    url = (blocker / "out").as_uri()
    with pytest.raises(ConfigError, match=f"^RENDER_STORAGE_URL='{url}' cannot be used: cannot write"):
        check_storage(WorkerSettings(storage_url=url))


def test_webhook_hosts_take_a_json_list_or_the_comma_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.settings import load

    for value in ('["127.0.0.1", "Hooks.Internal"]', "127.0.0.1, hooks.internal", "127.0.0.1 hooks.internal"):
        monkeypatch.setenv("RENDER_WEBHOOK_HOSTS", value)
        assert load(WorkerSettings).webhook_hosts == ("127.0.0.1", "hooks.internal")
    for value, problem in [
        ("bad host!", "'host!' is not a hostname"),
        ('["127.0.0.1"', "not a JSON list"),
        ("[1, 2]", "must be a JSON list of strings"),
        ("10.0.0.1/8", "not a valid CIDR network"),
    ]:
        monkeypatch.setenv("RENDER_WEBHOOK_HOSTS", value)
        with pytest.raises(ConfigError, match=f"^invalid setting: RENDER_WEBHOOK_HOSTS: .*{problem}") as refused:
            load(WorkerSettings)
        assert "\n" not in str(refused.value) and "Value error" not in str(refused.value)
    monkeypatch.setenv("RENDER_WEBHOOK_HOSTS", json.dumps(["ok.example", "two hosts"]))
    with pytest.raises(ConfigError, match="'two hosts' is not a hostname"):  # a list entry is one host, not split
        load(WorkerSettings)


def test_a_built_in_model_the_family_does_not_have_is_refused_and_every_family_s_own_pass() -> None:
    with pytest.raises(
        ConfigError, match="model 'm': 'tiny-schnell' is not a built-in sd15 model; use one of: tiny, or a diffusers"
    ):
        check_models({"m": ModelSource(family="sd15", source="tiny-schnell")})
    check_models(
        {
            "a": ModelSource(family="flux", source="tiny-schnell"),
            "b": ModelSource(family="flux", source="tiny"),
            "c": ModelSource(family="sd3", source="tiny"),
        }
    )


def test_a_saved_flux_and_sd3_directory_pass_and_a_family_mismatch_names_the_family_it_holds(tmp_path: Path) -> None:
    from worker.models import tiny_flux, tiny_sd3

    tiny_flux.build_schnell().save_pretrained(tmp_path / "flux")
    tiny_sd3.build().save_pretrained(tmp_path / "sd3")
    check_models(
        {
            "flux": ModelSource(family="flux", source=str(tmp_path / "flux")),
            "sd3": ModelSource(family="sd3", source=str(tmp_path / "sd3")),
        }
    )
    with pytest.raises(ConfigError, match='says "family": "sdxl" but .* holds a FluxPipeline; set "family" to "flux"'):
        check_models({"m": ModelSource(family="sdxl", source=str(tmp_path / "flux"))})


def test_a_compile_cache_that_cannot_be_made_is_refused_and_a_new_one_is_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="^RENDER_COMPILE_CACHE='.*file/cache' cannot be made"):
        check_compile_cache(str(tmp_path / "file" / "cache"))
    check_compile_cache(str(tmp_path / "shared" / "inductor"))
    assert (tmp_path / "shared" / "inductor").is_dir()
