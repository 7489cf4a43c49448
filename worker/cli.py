"""The `render` command. Errors print one line and exit non-zero; no traceback for user errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import kombu.exceptions
import redis
import typer
from rich.console import Console

from producer.errors import RenderError, RenderFailed, SpecError, StorageError
from producer.fleet import served_by
from producer.keys import DEFAULT_PRIORITY, Priority
from producer.spec import RenderSpec, json_schema
from worker.acl_cli import redis_acl
from worker.views.display import JobBoard, StepProgress, table_console
from worker.views.fleet_view import fleet_table, queue_table, workers_dict
from worker.views.status_view import status_dict, status_line

app = typer.Typer(
    name="render",
    help="Render diffusers jobs: locally, or through a fleet of Celery GPU workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 2

app.command("redis-acl")(redis_acl)


def read_spec(path: Path) -> RenderSpec:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec file {str(path)!r}: {exc.strerror or exc}") from None
    return RenderSpec.parse(data)


@app.command()
def local(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json", help="A render spec (see `render schema`).")],
    storage: Annotated[
        str | None, typer.Option(help="file:///dir or s3://bucket/prefix; default RENDER_STORAGE_URL.")
    ] = None,
    task_id: Annotated[str | None, typer.Option(help="Task id (default: a new one); results go under it.")] = None,
) -> None:
    """Render SPEC.json in this process and print the manifest as JSON."""
    spec = read_spec(spec_path)
    _quiet_libraries()
    from worker.settings import load_settings
    from worker.storage import open_storage

    # Settings and storage first: a mistake in either is reported before seconds of torch imports.
    settings = load_settings()
    target = open_storage(storage or settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    from worker.engine.inputs import load_inputs
    from worker.engine.job import JobContext
    from worker.engine.rendering import render
    from worker.models.registry import ModelRegistry

    inputs = load_inputs(spec, settings)
    progress = StepProgress()
    job = JobContext(spec, inputs=inputs, hooks=[progress], frame_threads=settings.frame_upload_threads)
    if task_id is not None:
        job = dataclasses.replace(job, task_id=task_id)  # checked like any id: '' is refused
    try:
        manifest = render(job, registry=ModelRegistry.from_settings(settings), storage=target)
    finally:
        progress.close()
    typer.echo(manifest.model_dump_json(indent=2))
    if manifest.status == "failed":
        raise typer.Exit(1)


@app.command()
def worker(
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Celery node name, e.g. gpu0@%h.")] = None,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run a GPU worker: one process, a thread per job in hand, acks late, events on (settings from RENDER_*)."""
    _quiet_libraries()
    from worker.process.preflight import check_worker
    from worker.settings import load_settings

    # The settings and their checks first: a setting that cannot work stops the worker here, before it takes a job
    # (exit 2), and before the seconds Celery, torch and diffusers take to import.
    settings = load_settings()
    check_worker(settings)
    from worker.celery_app import create_app, run_worker, worker_argv

    status = run_worker(create_app(settings), worker_argv(settings, hostname=hostname, loglevel=loglevel))
    # Celery's warm shutdown has ended every job (finished, handed back or recorded): exit now. Python's own
    # teardown of torch and the cached pipelines took another ~0.7 s that a stopping pod or spot machine spends
    # for nothing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _client() -> Any:
    from producer.client import RenderClient
    from producer.settings import ClientSettings, load

    return RenderClient(load(ClientSettings))


@app.command()
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json", help="A render spec (see `render schema`).")],
    task_id: Annotated[str | None, typer.Option(help="Task id (default: a new one).")] = None,
    queue: Annotated[
        str | None, typer.Option(help="One queue for every job (default: the job's model's queue under RENDER_QUEUE).")
    ] = None,
    priority: Annotated[
        Priority, typer.Option(help="high starts before any queued normal job; low after them.")
    ] = DEFAULT_PRIORITY,
    queue_anyway: Annotated[
        bool, typer.Option("--queue-anyway", help="Enqueue even if no live worker serves the model (autoscaling).")
    ] = False,
    webhook: Annotated[
        str | None, typer.Option(help="POST the signed manifest here when the job ends (see docs/webhooks.md).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job and print its manifest.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
) -> None:
    """Validate SPEC.json and enqueue it; print the task id (or, with --wait, the manifest)."""
    spec = read_spec(spec_path)
    if webhook is not None:
        spec = RenderSpec.parse({**spec.model_dump(exclude_unset=True), "webhook": webhook})
    client = _client()
    handle = client.submit(spec, task_id=task_id, queue=queue, priority=priority, wait_for_worker=queue_anyway)
    if not wait:
        typer.echo(handle.task_id)
        return
    typer.echo(f"submitted {handle.task_id}", err=True)
    final = None
    with JobBoard([handle.task_id], Console(stderr=True)) as board:
        for final in client.follow(handle.task_id, timeout=timeout):
            board.update(handle.task_id, final)
    assert final is not None
    if final.manifest is not None:
        typer.echo(final.manifest.model_dump_json(indent=2))
    if final.state in ("failed", "revoked", "expired"):
        typer.echo(f"task {handle.task_id} {final.state}" + (f": {final.error}" if final.error else ""), err=True)
        raise typer.Exit(1)


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="The task id `render submit` printed.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Print where a job stands: queued, started, progress, or its final state."""
    client = _client()
    current = client.status(task_id)
    if as_json:
        typer.echo(json.dumps({**status_dict(current), "webhook": client.webhook_delivery(task_id)}, indent=2))
        return
    typer.echo(status_line(current))


@app.command()
def revoke(task_id: Annotated[str, typer.Argument(help="The task to stop.")]) -> None:
    """Stop a job: a queued one never starts, a running one stops at its next step without decoding."""
    outcome = _client().revoke(task_id)
    typer.echo(
        {
            "revoked": f"revoked {task_id}: it stops at its next step, or never starts if still queued",
            "already-finished": f"{task_id} has already finished; nothing to revoke",
            "unknown": f"no task {task_id} is known; nothing to revoke",
        }[outcome]
    )


BATCH_ACTIONS = ("status", "revoke", "index")


@app.command()
def batch(
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE.jsonl|-|status|revoke|index",
            help="A JSONL file (one spec per line, `-` for stdin) to submit or resume; or an action on NAME.",
        ),
    ],
    batch_name: Annotated[
        str | None, typer.Argument(metavar="[NAME]", help="With status, revoke or index: the batch's name.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Batch name (default: the file's name and a hash of its content).")
    ] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return at once; follow with status.")] = False,
    webhook: Annotated[
        str | None, typer.Option(help="POST each job's signed manifest here when it ends (lines may set their own).")
    ] = None,
    priority: Annotated[Priority, typer.Option(help="high, normal or low, for every job of the batch.")] = (
        DEFAULT_PRIORITY
    ),
    queue_anyway: Annotated[
        bool, typer.Option("--queue-anyway", help="Enqueue even if no live worker serves a model (autoscaling).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With status: print every job as JSON.")] = False,
    storage: Annotated[
        str | None, typer.Option(help="Where the gallery goes: the workers' storage (default RENDER_STORAGE_URL).")
    ] = None,
    link_expiry: Annotated[
        int, typer.Option(min=60, max=7 * 24 * 3600, help="Seconds the gallery's S3 links stay valid.")
    ] = 7 * 24 * 3600,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
) -> None:
    """Submit a batch from a JSONL file and follow it live (run it again to resume), or act on one by NAME.

    \b
    render batch prompts.jsonl [--name N] [--detach] [--webhook URL]
    render batch status NAME [--json]
    render batch revoke NAME
    render batch index NAME      (write index.jsonl and index.html beside the results)
    """
    from producer.batch import default_name

    client = _client()
    if target in BATCH_ACTIONS and batch_name is not None:
        handle = client.batch(batch_name)
        if target == "status":
            _batch_status(handle, as_json)
        elif target == "revoke":
            _batch_revoke(handle, timeout)
        else:
            _batch_index(handle, storage, link_expiry)
        return
    if batch_name is not None:
        raise SpecError(f"unexpected argument {batch_name!r}: only status, revoke and index take a NAME")
    content = sys.stdin.buffer.read() if target == "-" else _read_file(Path(target))
    name = name or default_name(target, content)
    lines = content.decode("utf-8", errors="replace").splitlines()
    handle = client.submit_batch(
        lines, name=name, source=target, webhook=webhook, priority=priority, wait_for_worker=queue_anyway
    )
    typer.echo(handle.summary())
    if detach:
        typer.echo(f"follow it with: render batch status {name}")
        return
    from worker.views.batch_view import BatchDisplay

    with BatchDisplay(name) as display:
        final = handle.wait(timeout, on_progress=display.update)
    _batch_index(handle, storage, link_expiry, quiet_failure=True)
    if final.finished - final.states["succeeded"] - final.states["interrupted"] or final.states["unknown"]:
        typer.echo(f"batch {name}: not every job succeeded; see `render batch status {name}`", err=True)
        raise typer.Exit(1)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from None


def _batch_status(handle: Any, as_json: bool) -> None:
    from worker.views.batch_view import index_rows, status_table

    progress = handle.progress()
    rows = index_rows(handle)
    if not as_json:
        typer.echo(status_table(handle, progress, rows))
        return
    jobs = [
        {**dataclasses.asdict(row), "state": status.state, "step": status.step, "total": status.total}
        for row, (_, status) in zip(rows, handle.results(), strict=True)
    ]
    summary = {"name": handle.name, "total": progress.total, "states": dict(progress.states), "images": progress.images}
    typer.echo(json.dumps({**summary, "jobs": jobs}, indent=2))


def _batch_revoke(handle: Any, timeout: float | None) -> None:
    counts = handle.revoke()
    typer.echo(
        f"batch {handle.name}: {counts['dequeued']} taken off the queue, {counts['stopping']} stopping at their "
        f"next step, {counts['finished']} already finished (untouched)"
    )
    if counts["stopping"]:
        progress = handle.wait(timeout if timeout is not None else 120, interval=0.5)
        typer.echo(f"batch {handle.name}: nothing runs any more ({dict(progress.states)})")


def _batch_index(handle: Any, storage: str | None, link_expiry: int, *, quiet_failure: bool = False) -> None:
    from worker.settings import load_settings
    from worker.storage import open_storage
    from worker.views.batch_view import index_rows
    from worker.views.gallery import write_index

    try:
        settings = load_settings()
        target = open_storage(storage or settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
        jsonl, html = write_index(target, handle.name, index_rows(handle), expires=link_expiry)
    except (RenderError, OSError) as exc:
        if not quiet_failure:
            raise
        typer.echo(f"the gallery was not written ({exc}); write it with `render batch index {handle.name}`", err=True)
        return
    typer.echo(f"index: {jsonl}")
    typer.echo(f"gallery: {html}")


@app.command()
def workers(as_json: Annotated[bool, typer.Option("--json", help="Print the fleet as JSON.")] = False) -> None:
    """Show the live workers (models, loaded, job, step and tenant, loads, last seen) and the jobs queued per model."""
    client = _client()
    found = client.workers()
    by_tenant = client.tenant_queue_lengths(served_by(found))
    if as_json:
        typer.echo(json.dumps(workers_dict(found, by_tenant), indent=2))
        return
    if not found:
        typer.echo("no live worker: none has sent a heartbeat within its TTL (start one with `render worker`)")
        return
    console = table_console()
    console.print(fleet_table(found, time.time()))
    console.print(queue_table(by_tenant, client.settings.queue))


@app.command()
def models(
    check: Annotated[
        bool,
        typer.Option("--check", help="Run each model's start-up check and load it once here (exit 1 if any fails)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per model, for scripts.")] = False,
) -> None:
    """List the allowlist (RENDER_MODELS): family, kind, where, size, sha256 (cached), workers that have it loaded."""
    _quiet_libraries()
    from worker.settings import load_settings
    from worker.views.models_view import run

    raise typer.Exit(run(load_settings(), check=check, as_json=as_json))


@app.command()
def fetch(
    task_id: Annotated[str, typer.Argument(help="A finished task.")],
    out: Annotated[Path, typer.Option(help="Directory to copy the manifest, images and frames into.")] = Path("."),
    storage: Annotated[
        str | None, typer.Option(help="Storage URL the workers write to (default RENDER_STORAGE_URL).")
    ] = None,
) -> None:
    """Copy a finished job's manifest, images and frames from storage into OUT/TASK_ID/."""
    current = _client().status(task_id)
    if current.manifest is None:
        raise RenderError(f"task {task_id} is {current.state}; only a finished job with a manifest can be fetched")
    from worker.settings import load_settings
    from worker.storage import open_storage

    settings = load_settings()
    source = open_storage(storage or settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    target = out / task_id
    for url in [*current.manifest.images, *current.manifest.frames]:
        if not url.startswith(source.base_url + "/"):
            raise StorageError(f"{url} is not under {source.base_url}; pass --storage with the workers' storage URL")
        name = url.removeprefix(source.base_url + "/")
        data = source.get(name)
        if data is None:
            raise StorageError(f"{url} is listed in the manifest but missing from storage")
        path = target.joinpath(*name.split("/")[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        typer.echo(str(path))
    target.mkdir(parents=True, exist_ok=True)
    (target / "manifest.json").write_text(current.manifest.model_dump_json(indent=2))
    typer.echo(str(target / "manifest.json"))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; without RENDER_API_KEYS only a loopback one.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
) -> None:
    """Serve the HTTP job API (/v1, /docs) and the web console (/) over this farm (settings from RENDER_*)."""
    from producer.settings import load
    from service.serve import serve as run_service
    from service.settings import ServiceSettings

    run_service(load(ServiceSettings), host, port)


@app.command("api-key")
def api_key(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    scope: Annotated[
        str, typer.Option(help="full: submit, cancel and read; read: status, events and files only.")
    ] = "full",
    tenant: Annotated[
        str | None, typer.Option(help="The tenant the key acts as (one RENDER_TENANTS declares); unset: default.")
    ] = None,
) -> None:
    """Make a new API key: print it once, and the RENDER_API_KEYS entry that holds only its argon2id hash."""
    if scope not in ("full", "read"):
        raise SpecError(f"--scope: must be full or read; got {scope!r}")
    from producer.keys import check_tenant
    from service.auth import hash_key, new_key

    fields = {"scope": scope} if tenant is None else {"scope": scope, "tenant": check_tenant(tenant, "--tenant")}
    key = new_key()
    typer.echo(f"key (shown once; give it to the client): {key}")
    entry = json.dumps({name: {"hash": hash_key(key), **fields}})
    typer.echo(f"RENDER_API_KEYS entry (merge it into the JSON object): {entry}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its renders, log and contact sheet.")] = Path(
        "render-output/demo"
    ),
) -> None:
    """Start a private Redis and a worker, render a small batch live (one job revoked), then clean up."""
    _quiet_libraries()
    try:
        from localfarm.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("localfarm", "localfarm.demo"):
            raise
        typer.echo(
            "render demo runs from a checkout of the farm's source (localfarm/ is not in the worker image): "
            "clone the repository and run `make demo` there",
            err=True,
        )
        raise typer.Exit(2) from None

    if not run_demo(out, echo=typer.echo):
        raise typer.Exit(1)


@app.command("spec-from-png")
def spec_from_png(
    png_path: Annotated[Path, typer.Argument(metavar="FILE.png", help="A PNG with generation parameters.")],
    model: Annotated[str | None, typer.Option(help="The model the spec names (default: the PNG's).")] = None,
) -> None:
    """Print the render spec a PNG's metadata describes (this farm's exactly; A1111's, Forge's and ComfyUI's
    `parameters` as far as they map); what does not map goes to stderr as `not mapped: ...`."""
    from producer.png_params import spec_from_png as read_png

    try:
        spec, notes = read_png(png_path.read_bytes(), model=model)
    except OSError as exc:
        typer.echo(f"error: cannot read {str(png_path)!r}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    except SpecError as exc:
        typer.echo(f"error: {png_path}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(spec, indent=2))
    for note in notes:
        typer.echo(f"not mapped: {note}", err=True)


@app.command()
def schema() -> None:
    """Print the render spec's JSON Schema."""
    typer.echo(json_schema())


def _quiet_libraries() -> None:
    # No hub is reachable from a render node, and model loading must never try one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main() -> None:
    """Console entry point: usage errors are Typer's (exit 2); everything else is one line on stderr."""
    try:
        app()
    except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
        typer.echo(f"error: cannot reach Redis: {exc}; start it or set RENDER_REDIS_URL", err=True)
        sys.exit(EXIT_USER_ERROR)
    except RenderError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1 if isinstance(exc, RenderFailed) else EXIT_USER_ERROR)
    except Exception as exc:  # a bug or the environment: still one line; RENDER_DEBUG=1 shows the traceback
        if os.environ.get("RENDER_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (set RENDER_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
