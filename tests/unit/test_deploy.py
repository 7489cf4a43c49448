"""The deployment files, checked without a Docker engine: compose structure, required settings, images."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from producer import acl
from producer.keys import active_list, model_queue, priority_lists
from worker.settings import WorkerSettings

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SENTINEL = ROOT / "docker-compose.sentinel.yml"
# The settings .env.example leaves empty for the operator to fill in; every other one has a working default.
SECRETS = (
    "REDIS_PASSWORD",
    "RENDER_ACL_PASSWORD_WORKER",
    "RENDER_ACL_PASSWORD_SERVICE",
    "RENDER_ACL_PASSWORD_MONITOR",
    "MINIO_ROOT_PASSWORD",
    "FLOWER_PASSWORD",
    "RENDER_API_KEYS",
)
# Every Redis client waits for the one-shot that creates its Redis user.
ACL_READY = {"redis-acl": {"condition": "service_completed_successfully"}}
# The SHA-256 of each license's text as its steward publishes it (www.apache.org/licenses/LICENSE-2.0.txt).
LICENSE_TEXTS = {"Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_stateful_service_has_a_healthcheck_and_dependents_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "worker-gpu0", "worker-gpu1", "flower"} <= set(services)
    for name in ("redis", "minio", "worker-gpu0", "worker-gpu1", "flower"):
        assert "test" in services[name]["healthcheck"], name
    ready = {"redis": {"condition": "service_healthy"}, "minio-init": {"condition": "service_completed_successfully"}}
    ready |= ACL_READY
    for name in ("worker-gpu0", "worker-gpu1"):
        assert services[name]["depends_on"] == ready, name
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["flower"]["depends_on"] == {"redis": {"condition": "service_healthy"}} | ACL_READY


def test_the_worker_has_time_to_finish_a_step(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-gpu0"]
    # The SIGTERM hand-off: the drain, then a finishing job's decode and upload, well within the grace period.
    assert worker["stop_grace_period"] == "1m" and WorkerSettings().drain_seconds + 30 <= 60
    assert worker["command"][:2] == ["render", "worker"]
    assert "ping" in " ".join(worker["healthcheck"]["test"])


def test_secrets_are_required_and_listed_in_env_example(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD"} <= required
    example = env_example()
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    flower = compose["services"]["flower"]["environment"]
    assert flower["FLOWER_BASIC_AUTH"] == "${FLOWER_USER:?set it in .env}:${FLOWER_PASSWORD:?set it in .env}"
    assert "--aclfile /data/users.acl" in " ".join(compose["services"]["redis"]["command"])


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def filled_env() -> dict[str, str]:
    """.env.example as an operator fills it in: each empty setting given a value of its own."""
    return {name: value or f"{name.lower().replace('_', '-')}-4f9c2a7e" for name, value in env_example().items()}


def rendered_compose(env: dict[str, str], path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file as `docker compose config` renders it with `env`: `${VAR}`, `${VAR:-default}`,
    `${VAR:?error}` replaced, `$$` left as one `$` for the container's shell (compose-spec interpolation)."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":  # compose stops here, before it creates, pulls or builds anything
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return arg or ""

    pattern = re.compile(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}")
    return yaml.safe_load(pattern.sub(value, path.read_text()))


def merged(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """`docker compose -f base -f override`'s model (compose-spec merge rules): mappings merge, sequences append,
    except the shell commands, which the later file replaces."""
    result = dict(base)
    for key, value in override.items():
        here = f"{path}.{key}"
        if key not in base or re.search(r"^\.services\.[^.]+\.(command|entrypoint|healthcheck\.test)$", here):
            result[key] = value
        elif isinstance(value, dict):
            result[key] = merged(base[key], value, here)
        elif isinstance(value, list):
            result[key] = [*base[key], *value]
        else:
            result[key] = value
    return result


def test_no_secret_is_on_any_service_s_command_line() -> None:
    env = filled_env()
    secrets = {name: env[name] for name in SECRETS}
    services = rendered_compose(env)["services"]
    sentinel = rendered_compose(env, SENTINEL)["services"]
    for name, service in [*services.items(), *sentinel.items()]:
        parts = (service.get("entrypoint"), service.get("command"), (service.get("healthcheck") or {}).get("test"))
        shown = " ".join(" ".join(part) if isinstance(part, list) else str(part or "") for part in parts)
        for secret, text in secrets.items():
            assert text not in shown, f"{secret} is on the command line of service {name}: {shown}"
    # They reach the services through the environment instead.
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == secrets["REDIS_PASSWORD"]
    assert secrets["RENDER_ACL_PASSWORD_MONITOR"] in services["flower"]["environment"]["CELERY_BROKER_URL"]
    assert secrets["FLOWER_PASSWORD"] in services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert secrets["MINIO_ROOT_PASSWORD"] in services["minio-init"]["environment"]["MC_HOST_farm"]
    assert secrets["RENDER_ACL_PASSWORD_WORKER"] in services["worker-gpu0"]["environment"]["RENDER_REDIS_URL"]


def test_worker_image_runs_as_a_non_root_user_with_a_model_cache() -> None:
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert 'VOLUME ["/models"]' in dockerfile and "HF_HUB_OFFLINE=1" in dockerfile


def _dockerignore_patterns(ignore: Path) -> list[tuple[bool, str]]:
    lines = ignore.read_text().splitlines()
    return [(line.startswith("!"), line.removeprefix("!")) for line in lines if line and not line.startswith("#")]


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern (`*` and `?` within a name, `**` any depth) matches a path or a parent dir of it."""
    regex = "/".join(
        "(?:.*)"
        if part == "**"
        else "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in part)
        for part in pattern.split("/")
    ).replace("(?:.*)/", "(?:.*/)?")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts)))


def build_context(root: Path, ignore: Path = ROOT / ".dockerignore") -> list[str]:
    """The files `docker build` would send from `root` under the `ignore` file (the last matching pattern wins)."""
    patterns = _dockerignore_patterns(ignore)

    def included(path: str) -> bool:
        keep = True
        for exception, pattern in patterns:
            if _matches(pattern, path):
                keep = exception
        return keep

    def may_hold_included(path: str) -> bool:  # an excluded directory is walked only if an exception names below it
        return included(path) or any(exc and pat.startswith(path + "/") for exc, pat in patterns)

    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = [d for d in dirs if may_hold_included(prefix + d)]
        found.extend(prefix + name for name in files if included(prefix + name))
    return sorted(found)


def test_the_build_context_holds_the_code_and_nothing_else() -> None:
    context = build_context(ROOT)
    assert {"pyproject.toml", "README.md", "constraints.txt", "producer/__init__.py", "worker/cli.py"} <= set(context)
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "LICENSE", "constraints.txt", "producer", "worker"}, tops
    assert not [path for path in context if "__pycache__" in path or path.endswith(".pyc")]
    # Every file the Dockerfile copies is in the context; LICENSE too, which the wheel built there carries.
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    copied = [
        name
        for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE)
        for name in source.split()
    ]
    assert "LICENSE" in copied
    for name in copied:
        assert any(path == name or path.startswith(name.rstrip("/") + "/") for path in context), name


def test_the_dockerignore_rules_follow_docker_s_matching(tmp_path: Path) -> None:
    for name in (
        ".venv/lib/x.py",
        ".git/HEAD",
        "render-output/a.png",
        ".env",
        "worker/__pycache__/a.pyc",
        "worker/a.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert build_context(tmp_path) == ["worker/a.py"]


def locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==", 1) for line in lines if line and not line.startswith("#")]
    return {str(canonicalize_name(name)): version for name, version in pins}


def test_make_install_and_the_image_resolve_to_the_same_versions() -> None:
    pins = locked()
    # This environment is the one `make install` built: every locked distribution is installed at its version
    # (torch's CPU build carries a local label, +cpu; the image's CUDA build from PyPI has none).
    # Each name as an import finds it (the first on sys.path): a test that imported setuptools puts its vendored
    # copies (importlib_metadata 8.7, zipp 3.23) on sys.path after site-packages, and a scan of every
    # distribution let the last one found win.
    installed: dict[str, str] = {}
    for name in pins:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            installed[name] = importlib.metadata.version(name)
    wrong = {
        name: (version, installed.get(name))
        for name, version in pins.items()
        if (installed.get(name) or "").split("+")[0] != version
    }
    assert not wrong, f"installed versions differ from constraints.txt (run `make install` or `make lock`): {wrong}"
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {pins['torch']}" in makefile
    assert makefile.count("-c constraints.txt") == 2, "make install pins torch and the project through the lock"
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt" in dockerfile
    assert "COPY pyproject.toml constraints.txt ./" in dockerfile
    # What the image installs is pyproject's own list, and all of it is locked.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["worker"]:
        assert canonicalize_name(Requirement(requirement).name) in pins, requirement


def test_the_image_layers_dependencies_before_code_and_runs_as_a_numeric_user_under_an_init() -> None:
    dockerfile = (ROOT / "infra" / "worker.Dockerfile").read_text()
    steps = [line.split()[0] for line in dockerfile.splitlines() if line and not line[0].isspace() and line[0] != "#"]
    copies = re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE)
    assert copies[0] == "pyproject.toml constraints.txt", "the dependency layer needs only these"
    install = dockerfile.index("-r /tmp/requirements.txt")
    assert all(dockerfile.index(f"COPY {code}") > install for code in ("producer", "worker")), "code after deps"
    assert re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1] == "10001"
    assert 'ENTRYPOINT ["dumb-init", "--"]' in dockerfile and "HEALTHCHECK" in steps


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
    triggers = kinds["ScaledObject"]["spec"]["triggers"]
    lists = {t["metadata"]["listName"] for t in triggers if t["type"] == "redis"}
    (model,) = models
    queued = set(priority_lists(model_queue("render", model)).values())
    assert lists == queued | {active_list(model_queue("render", model))}, "every priority list and the running jobs"
    # The triggers' credentials are defined, from the workers' own Secret.
    auth = kinds["TriggerAuthentication"]
    assert {t["authenticationRef"]["name"] for t in triggers} == {auth["metadata"]["name"]}
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "render-redis", "key": "password"}]
    # A running worker's jobs keep it: the running-jobs trigger's target is the jobs one worker holds.
    held = WorkerSettings().jobs_in_hand
    assert any(t["metadata"]["listName"] not in queued and int(t["metadata"]["listLength"]) == held for t in triggers)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert "ping" in " ".join(container["livenessProbe"]["exec"]["command"])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_kubernetes_workers_serve_metrics_where_prometheus_scrapes() -> None:
    """RENDER_METRICS_PORT, the container's `metrics` port and the pod's scrape annotations name one port."""
    documents = yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text())
    template = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]
    container = template["spec"]["containers"][0]
    port = WorkerSettings(metrics_port=next(e["value"] for e in container["env"] if e["name"] == "RENDER_METRICS_PORT"))
    assert {"name": "metrics", "containerPort": port.metrics_port} in container.get("ports", [])
    annotations = template["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/path") == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port.metrics_port


def test_compose_runs_two_worker_services_with_different_models(compose: dict[str, Any]) -> None:
    services = compose["services"]
    served = [json.loads(services[name]["environment"]["RENDER_MODELS"]) for name in ("worker-gpu0", "worker-gpu1")]
    assert set(served[0]).isdisjoint(served[1])
    assert services["worker-gpu1"]["stop_grace_period"] == services["worker-gpu0"]["stop_grace_period"]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose client is not installed",
)
def test_docker_compose_config_accepts_the_files_once_the_secrets_are_filled_in(tmp_path: Path) -> None:
    filled, example = tmp_path / "filled.env", tmp_path / "example.env"
    filled.write_text("".join(f"{name}={value}\n" for name, value in filled_env().items()))
    example.write_text((ROOT / ".env.example").read_text())

    def config(env: Path) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(COMPOSE), "-f", str(SENTINEL)]
        return subprocess.run(
            ["docker", "compose", "--env-file", str(env), *files, "config", "-q"], capture_output=True, text=True
        )

    assert config(filled).returncode == 0, config(filled).stderr
    refused = config(example)
    assert refused.returncode != 0 and "set it in .env" in refused.stderr, refused.stderr


def test_the_sentinel_variant_points_workers_and_flower_at_the_sentinels() -> None:
    services = rendered_compose(filled_env(), SENTINEL)["services"]
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    for name in ("worker-gpu0", "worker-gpu1", "api"):
        env = services[name]["environment"]
        assert env["RENDER_REDIS_URL"].count("sentinel://") == 3 and env["RENDER_REDIS_MASTER_NAME"] == "farm"
        WorkerSettings(redis_url=env["RENDER_REDIS_URL"], redis_master_name=env["RENDER_REDIS_MASTER_NAME"])
    assert "sentinel monitor farm redis 6379 2" in " ".join(services["sentinel-1"]["command"])
    assert services["flower"]["environment"]["CELERY_BROKER_URL"].startswith("sentinel://")
    # With the default user off: each client as its role's user, the sentinels and the replica as admin, and the
    # role users applied to the replica too (it does not copy its master's).
    urls = {name: services[name]["environment"]["RENDER_REDIS_URL"] for name in ("worker-gpu0", "worker-gpu1", "api")}
    urls["flower"] = services["flower"]["environment"]["CELERY_BROKER_URL"]
    roles = {name: urlparse(url.split(";")[0]).username for name, url in urls.items()}
    assert roles == {"worker-gpu0": "worker", "worker-gpu1": "worker", "api": "service", "flower": "monitor"}
    assert "sentinel auth-user farm admin" in " ".join(services["sentinel-1"]["command"])
    assert "masteruser admin" in " ".join(services["redis-replica"]["command"])
    acl = services["redis-acl"]
    assert urlparse(acl["environment"]["RENDER_ACL_REPLICA_ADMIN_URL"]).hostname == "redis-replica"
    assert " ".join(acl["command"]).count("render redis-acl --apply --save") == 2
    config: dict[str, Any] = {}
    exec((ROOT / "infra" / "flower" / "celeryconfig.py").read_text(), config)
    assert config["broker_transport_options"] == {"master_name": "farm"}


def gpu_of_each_worker(services: dict[str, Any]) -> dict[str, str]:
    """The one GPU each worker service reserves, by device id; fails where two containers could share one."""
    gpus: dict[str, str] = {}
    for name, service in services.items():
        if service.get("command", [])[:2] != ["render", "worker"]:
            continue
        deploy = service["deploy"]
        # A service's replicas share its reservation, and Docker gives `count: 1` the first GPU, every time.
        assert deploy.get("replicas", 1) == 1, f"{name}: its replicas would share one GPU"
        (device,) = deploy["resources"]["reservations"]["devices"]
        assert "count" not in device, f"{name} reserves a GPU by count, which is GPU 0 for every container"
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        (gpus[name],) = device["device_ids"]
    return gpus


def test_each_worker_service_reserves_a_gpu_of_its_own() -> None:
    env = filled_env()
    main = rendered_compose(env)
    for project in (main, merged(main, rendered_compose(env, SENTINEL))):
        gpus = gpu_of_each_worker(project["services"])
        assert len(gpus) >= 2, gpus
        assert len(set(gpus.values())) == len(gpus), f"two workers on one GPU: {gpus}"


def test_the_sentinel_file_only_adds_to_services_of_the_main_file() -> None:
    main = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in yaml.safe_load(SENTINEL.read_text())["services"].items():
        # A service without an image is an override: one whose name the main file lacks would not start.
        assert "image" in service or name in main, f"{name} in {SENTINEL.name} overrides no service"


def test_compose_refuses_to_start_until_every_secret_is_filled_in() -> None:
    example = env_example()
    assert {name for name, value in example.items() if not value} == set(SECRETS)
    for path in (COMPOSE, SENTINEL):
        text = path.read_text()
        # No use of a secret has a default to fall back on: an empty one stops compose before any container.
        uses = re.findall(r"\$\{(" + "|".join(SECRETS) + r")(:\?|:-|\?|-|\})", text)
        assert uses and {op for _, op in uses} == {":?"}, uses
        for secret in {name for name, _ in uses}:
            with pytest.raises(ValueError, match=f"^required variable {secret} is missing a value: set it in .env$"):
                rendered_compose({**filled_env(), secret: ""}, path)
        with pytest.raises(ValueError, match=f"required variable ({'|'.join(SECRETS)}) is missing"):
            rendered_compose(example, path)  # `cp .env.example .env && docker compose up` as it stands
        rendered_compose(filled_env(), path)


def test_the_license_file_is_the_one_pyproject_names() -> None:
    spdx = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    text = (ROOT / "LICENSE").read_bytes()
    assert text.split()[:4] == [b"Apache", b"License", b"Version", b"2.0,"] and spdx == "Apache-2.0"
    assert hashlib.sha256(text).hexdigest() == LICENSE_TEXTS[spdx], "LICENSE is not the license's published text"


SERVICE_DOCKERFILE = ROOT / "infra" / "service.Dockerfile"
API_K8S = ROOT / "infra" / "k8s" / "api.yaml"


def test_compose_serves_the_http_api_with_required_keys_and_a_liveness_check(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["command"] == ["render", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert api["ports"] == ["8080:8080"] and api["build"]["dockerfile"] == "infra/service.Dockerfile"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    ready = {"redis": {"condition": "service_healthy"}, "minio-init": {"condition": "service_completed_successfully"}}
    assert api["depends_on"] == ready | ACL_READY
    # No default key: compose stops until .env names one (the service would refuse 0.0.0.0 without it anyway).
    assert api["environment"]["RENDER_API_KEYS"] == "${RENDER_API_KEYS:?set it in .env}"
    assert env_example()["RENDER_API_KEYS"] == ""
    # The same storage as the workers, so its file links point at what they wrote.
    env = rendered_compose(filled_env())["services"]
    for name in ("RENDER_STORAGE_URL", "RENDER_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        assert env["api"]["environment"][name] == env["worker-gpu0"]["environment"][name], name
    assert urlparse(env["api"]["environment"]["RENDER_REDIS_URL"])._replace(netloc="") == urlparse(
        env["worker-gpu0"]["environment"]["RENDER_REDIS_URL"]
    )._replace(netloc=""), "the same Redis, each as its own user"


def test_the_api_settings_take_what_render_api_key_prints() -> None:
    from service.auth import hash_key
    from service.settings import ServiceSettings

    keys = json.dumps({"ci": {"hash": hash_key("rk_example"), "scope": "full"}})
    env = rendered_compose({**filled_env(), "RENDER_API_KEYS": keys})["services"]["api"]["environment"]
    settings = ServiceSettings(
        api_keys=env["RENDER_API_KEYS"], redis_url=env["RENDER_REDIS_URL"], storage_url=env["RENDER_STORAGE_URL"]
    )
    assert settings.api_keys["ci"].hash.startswith("$argon2id$") and settings.api_keys["ci"].scope == "full"


def test_without_a_key_the_service_refuses_to_bind_beyond_loopback() -> None:
    from producer.errors import ConfigError
    from service.serve import check_bind
    from service.settings import ServiceSettings

    with pytest.raises(ConfigError, match="RENDER_API_KEYS"):
        check_bind(ServiceSettings(), "0.0.0.0")
    check_bind(ServiceSettings(), "127.0.0.1")


def test_the_api_image_is_light_locked_and_runs_render_serve_as_a_numeric_user() -> None:
    dockerfile = SERVICE_DOCKERFILE.read_text()
    assert "['optional-dependencies']['serve']" in dockerfile and "'worker'" not in dockerfile, "no torch"
    assert "pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt" in dockerfile
    copies = re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE)
    assert copies[0] == "pyproject.toml constraints.txt", "the dependency layer needs only these"
    install = dockerfile.index("-r /tmp/requirements.txt")
    assert all(dockerfile.index(f"COPY {code}") > install for code in ("producer", "worker", "service"))
    assert re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1] == "10001"
    assert 'ENTRYPOINT ["dumb-init", "--"]' in dockerfile and "/healthz" in dockerfile
    assert 'CMD ["render", "serve", "--host", "0.0.0.0", "--port", "8080"]' in dockerfile
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["serve"]:
        assert canonicalize_name(Requirement(requirement).name) in pins, requirement


def test_the_api_image_s_build_context_holds_what_it_copies() -> None:
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile in place of the root one (the worker's).
    context = build_context(ROOT, SERVICE_DOCKERFILE.with_name(SERVICE_DOCKERFILE.name + ".dockerignore"))
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "LICENSE", "constraints.txt", "producer", "worker", "service"}
    assert "service/static/index.html" in context, "the console's files"
    assert not [path for path in context if "__pycache__" in path or path.endswith(".pyc")]
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", SERVICE_DOCKERFILE.read_text(), re.MULTILINE)
    for name in (name for source in copied for name in source.split()):
        assert any(path == name or path.startswith(name.rstrip("/") + "/") for path in context), name


def test_kubernetes_api_probes_its_health_and_readiness_and_reads_keys_from_a_secret() -> None:
    documents = {d["kind"]: d for d in yaml.safe_load_all(API_K8S.read_text())}
    pod = documents["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["render", "serve", "--host", "0.0.0.0", "--port", "8080"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["RENDER_API_KEYS"] == {
        "name": "RENDER_API_KEYS",
        "valueFrom": {"secretKeyRef": {"name": "render-api-keys", "key": "keys"}},
    }, "keys come from a Secret, never a literal value"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    service = documents["Service"]["spec"]
    assert (
        service["selector"] == pod["metadata"]["labels"] == documents["Deployment"]["spec"]["selector"]["matchLabels"]
    )
    assert [p["targetPort"] for p in service["ports"]] == ["http"]


def test_every_redis_client_logs_in_as_its_role_and_only_redis_acl_as_admin() -> None:
    """The ACL wiring: a user per role with the password `render redis-acl` reads for it, the default user off,
    the admin user (REDIS_PASSWORD) for the one-shot that creates the users and for nothing else."""
    env = filled_env()
    services = rendered_compose(env)["services"]
    roles = {role.user: role.password_env for role in acl.roles([], "render")}
    users = {"worker-gpu0": "worker", "worker-gpu1": "worker", "api": "service", "flower": "monitor"}
    for name, service in services.items():
        environment = service.get("environment") or {}
        urls = [value for key, value in environment.items() if key.endswith(("REDIS_URL", "BROKER_URL"))]
        if name in users:
            (url,) = urls
            parsed = urlparse(url)
            assert (parsed.username, parsed.password) == (users[name], env[roles[users[name]]]), name
            assert service["depends_on"]["redis-acl"] == ACL_READY["redis-acl"], name
        shown = " ".join(map(str, environment.values()))
        if name not in ("redis", "redis-acl"):
            assert env["REDIS_PASSWORD"] not in shown, f"{name} has the admin password"
            assert not [url for url in urls if not urlparse(url).username], f"{name} logs in as the default user"
    one_shot = services["redis-acl"]
    assert one_shot["command"] == ["render", "redis-acl", "--apply", "--save"] and one_shot["restart"] == "no"
    assert one_shot["depends_on"] == {"redis": {"condition": "service_healthy"}}
    admin = urlparse(one_shot["environment"]["RENDER_ACL_ADMIN_URL"])
    assert (admin.username, admin.password, admin.hostname) == ("admin", env["REDIS_PASSWORD"], "redis")
    for user, variable in roles.items():
        assert one_shot["environment"][variable] == env[variable], user
    assert one_shot["environment"]["RENDER_TENANTS"] == services["worker-gpu0"]["environment"]["RENDER_TENANTS"]
    redis_command = " ".join(services["redis"]["command"])
    assert 'echo "user default off"' in redis_command and "sha256sum" in redis_command
    assert "redis-cli --user admin ping" in " ".join(services["redis"]["healthcheck"]["test"])
