"""The deployment files, checked without a Docker engine: compose structure, required settings, images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.keys import model_queue, priority_lists
from worker.settings import WorkerSettings

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_stateful_service_has_a_healthcheck_and_dependents_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "worker", "flower"} <= set(services)
    for name in ("redis", "minio", "worker", "flower"):
        assert "test" in services[name]["healthcheck"], name
    assert services["worker"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["flower"]["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_the_worker_reserves_a_gpu_and_has_time_to_finish_a_step(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert worker["deploy"]["replicas"] == "${WORKERS:-1}", "one setting runs one worker per GPU"
    # The SIGTERM hand-off: the drain, then a finishing job's decode and upload, well within the grace period.
    assert worker["stop_grace_period"] == "1m" and WorkerSettings().drain_seconds + 30 <= 60
    assert worker["command"][:2] == ["render", "worker"]
    assert "ping" in " ".join(worker["healthcheck"]["test"])


def test_secrets_are_required_and_listed_in_env_example(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD"} <= required
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    assert "--basic-auth=${FLOWER_USER:?Variable not set}:${FLOWER_PASSWORD:?Variable not set}" in text
    assert "--requirepass" in " ".join(compose["services"]["redis"]["command"])


def test_worker_image_runs_as_a_non_root_user_with_a_model_cache() -> None:
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert 'VOLUME ["/models"]' in dockerfile and "HF_HUB_OFFLINE=1" in dockerfile


def test_redis_keeps_queued_jobs() -> None:
    conf = (ROOT / "infra" / "redis" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.MULTILINE)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.MULTILINE)


def test_kubernetes_example_scales_on_the_queue() -> None:
    documents = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    models = json.loads(next(e["value"] for e in container["env"] if e["name"] == "RENDER_MODELS"))
    lists = {t["metadata"]["listName"] for t in kinds["ScaledObject"]["spec"]["triggers"] if t["type"] == "redis"}
    (model,) = models
    assert lists == set(priority_lists(model_queue("render", model)).values()), "every priority list of its model"


def test_compose_runs_two_worker_services_with_different_models(compose: dict[str, Any]) -> None:
    services = compose["services"]
    served = [json.loads(services[name]["environment"]["RENDER_MODELS"]) for name in ("worker", "worker-sdxl")]
    assert set(served[0]).isdisjoint(served[1])
    assert services["worker-sdxl"]["stop_grace_period"] == services["worker"]["stop_grace_period"]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose client is not installed",
)
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text())
    result = subprocess.run(
        ["docker", "compose", "--env-file", str(env), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
