"""`create_app(settings)`: the FastAPI app of `render serve`: the job API under /v1, probes, and the console."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.client import RenderClient
from producer.errors import RenderError
from service import batches, errors, events, files, jobs
from service.auth import Keys
from service.deps import Reader, Service, service
from service.limits import BodyLimit
from service.settings import ServiceSettings
from worker.storage import open_storage

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
VERSION = "1"


class ModelInfo(BaseModel):
    name: str
    family: str | None
    workers: list[str]
    queued: dict[str, int]


class ModelList(BaseModel):
    models: list[ModelInfo]


class WorkerList(BaseModel):
    workers: list[dict[str, Any]]


fleet = APIRouter(prefix="/v1", tags=["fleet"])
probes = APIRouter(tags=["probes"])


@fleet.get("/models", summary="Models the live workers serve, and their queues")
def models(service: Reader) -> ModelList:
    workers = service.client.workers()
    served: dict[str, list[str]] = {}
    families: dict[str, str] = {}
    for info in workers:
        for model in info.models:
            served.setdefault(model, []).append(info.hostname)
        families.update(info.families)
    queued = service.client.queue_lengths(sorted(served))
    return ModelList(
        models=[
            ModelInfo(name=model, family=families.get(model), workers=hosts, queued=queued.get(model, {}))
            for model, hosts in sorted(served.items())
        ]
    )


@fleet.get("/workers", summary="The live workers' adverts")
def workers(service: Reader) -> WorkerList:
    """Every live worker; the job in hand (and its step) only where the key's tenant may read that job."""
    found = []
    for info in service.client.workers():
        if info.job is not None and not service.client.owns(info.job):
            info = dataclasses.replace(info, job=None, step=None, total=None)
        found.append(dataclasses.asdict(info))
    return WorkerList(workers=found)


@probes.get("/healthz", summary="Liveness: the process answers (touches nothing)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _ready(service: Service) -> dict[str, str]:
    problems = {}
    try:
        service.client.redis.ping()
    except Exception as exc:  # any way Redis can be away: the probe says so rather than failing
        problems["redis"] = f"{type(exc).__name__}: {exc}"
    try:
        service.storage.get("readyz-probe")
    except RenderError as exc:
        problems["storage"] = str(exc)
    return problems


@probes.get("/readyz", summary="Readiness: Redis answers PING and storage is reachable")
async def readyz(found: Annotated[Service, Depends(service)]) -> JSONResponse:
    problems = await run_in_threadpool(_ready, found)
    if problems:
        message = "; ".join(f"{part}: {why}" for part, why in problems.items())
        return errors.error_response(503, "unavailable", f"not ready: {message}")
    return JSONResponse({"status": "ready"})


def create_app(settings: ServiceSettings, *, client: RenderClient | None = None) -> FastAPI:
    """The service over the farm `settings` name (a `client` given is used instead of a new one)."""
    parts = Service(
        settings=settings,
        client=client or RenderClient(settings),
        storage=open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url),
        keys=Keys(settings.api_keys),
    )
    app = FastAPI(
        title="render farm",
        version=VERSION,
        summary="Submit, follow and cancel diffusers render jobs; browse their files; watch the fleet.",
        description="Authenticate with `Authorization: Bearer <key>` when keys are configured (RENDER_API_KEYS). "
        'Every error is `{"error": {"code", "message", "field"}}`. See docs/http.md.',
    )
    app.state.service = parts
    errors.install(app)
    for router in (jobs.router, events.router, batches.router, files.router, fleet, probes):
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise errors.ApiError(404, "not_found", "the console is not installed (service/static/index.html)")
        return FileResponse(index)

    app.mount("/console", StaticFiles(directory=STATIC, html=True, check_dir=False), name="console")
    return app
