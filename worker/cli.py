"""The `render` command. Errors print one line and exit non-zero; no traceback for user errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from producer.errors import RenderError, RenderFailed, SpecError
from producer.spec import RenderSpec, json_schema

app = typer.Typer(
    name="render",
    help="Render diffusers jobs: locally, or through a fleet of Celery GPU workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 2


class ProgressBar:
    """A one-line progress display on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream: Any = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())

    def on_step(self, info: Any) -> None:
        if not self.enabled:
            return
        filled = round(self.width * info.steps_completed / max(info.steps_planned, 1))
        bar = "#" * filled + "." * (self.width - filled)
        rate = info.steps_completed / info.elapsed if info.elapsed > 0 else 0.0
        self.stream.write(f"\r[{bar}] {info.steps_completed}/{info.steps_planned} steps  {rate:5.1f} it/s")
        if info.steps_completed >= info.steps_planned:
            self.stream.write("\n")
        self.stream.flush()


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
    from worker.models.registry import ModelRegistry
    from worker.render import render
    from worker.settings import load_settings
    from worker.storage import open_storage

    settings = load_settings()
    target = open_storage(storage or settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    manifest = render(
        spec,
        registry=ModelRegistry.from_settings(settings),
        storage=target,
        task_id=task_id,
        hooks=[ProgressBar()],
        frame_threads=settings.frame_upload_threads,
    )
    typer.echo(manifest.model_dump_json(indent=2))
    if manifest.status == "failed":
        raise typer.Exit(1)


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
