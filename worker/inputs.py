"""Input images (img2img, inpaint, ControlNet): fetched, capped, decoded and checked before any GPU work.

Accepted references: `s3://bucket/key` (the worker's S3 endpoint and credentials), `file:///path` under
one of `RENDER_INPUT_ROOTS`, or inline `data:image/<png|jpeg|webp>;base64,...`. Every failure is a
`SpecError` naming the field, except S3 that cannot be reached: retried with backoff for
`RENDER_STORAGE_RETRY_SECONDS`, as outputs are, then `StorageUnavailable`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from producer.errors import SpecError, StorageError, StorageUnavailable
from producer.spec import RenderSpec
from worker.settings import WorkerSettings
from worker.storage import S3Storage


def load_inputs(spec: RenderSpec, settings: WorkerSettings) -> dict[str, Image.Image]:
    """Every image the spec names, decoded and checked against the spec's size."""
    images = {}
    for field in ("image", "mask_image", "control_image"):
        ref = getattr(spec, field)
        if ref is None:
            continue
        image = decode(field, fetch(field, ref, settings), settings.max_input_pixels)
        if image.size != (spec.width, spec.height):
            raise SpecError(
                f"{field}: is {image.size[0]}x{image.size[1]} but the spec asks for {spec.width}x{spec.height}; "
                "resize it or change width/height"
            )
        images[field] = image.convert("L" if field == "mask_image" else "RGB")
    if spec.ip_adapter is not None:  # any size: the image encoder resizes it
        field = "ip_adapter.image"
        images["ip_adapter_image"] = decode(
            field, fetch(field, spec.ip_adapter.image, settings), settings.max_input_pixels
        )
        images["ip_adapter_image"] = images["ip_adapter_image"].convert("RGB")
    return images


def fetch(field: str, ref: str, settings: WorkerSettings) -> bytes:
    cap = settings.max_input_bytes
    if ref.startswith("data:"):
        try:
            data = base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            raise SpecError(f"{field}: the inline image is not valid base64") from None
    elif ref.startswith("file://"):
        data = _read_file(field, ref, settings)
    else:
        data = _read_s3(field, ref, settings)
    if len(data) > cap:
        raise SpecError(f"{field}: the image is {len(data)} bytes, over the {cap}-byte cap (RENDER_MAX_INPUT_BYTES)")
    return data


def _read_file(field: str, ref: str, settings: WorkerSettings) -> bytes:
    parsed = urlparse(ref)
    if parsed.netloc not in ("", "localhost"):
        raise SpecError(f"{field}: file:// URLs name no host; use file:///absolute/path")
    path = Path(unquote(parsed.path)).resolve()
    roots = [Path(root).resolve() for root in settings.input_roots]
    if not any(path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none (RENDER_INPUT_ROOTS is empty)"
        raise SpecError(f"{field}: {path} is outside the allowed input roots ({allowed})")
    try:
        size = path.stat().st_size
        if size > settings.max_input_bytes:
            raise SpecError(f"{field}: the image is {size} bytes, over the {settings.max_input_bytes}-byte cap")
        return path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{field}: {path} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"{field}: {path} is a directory, not an image") from None
    except PermissionError:
        raise SpecError(f"{field}: {path} cannot be read (permission denied)") from None


def _read_s3(field: str, ref: str, settings: WorkerSettings) -> bytes:
    parsed = urlparse(ref)
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key:
        raise SpecError(f"{field}: {ref!r} needs a bucket and a key (s3://bucket/key)")
    # An outage is retried for the budget outputs get, then fails as storage (the spec is not at fault);
    # a missing bucket or refused access is the spec's reference, named by its field.
    source = S3Storage(
        parsed.netloc, endpoint_url=settings.s3_endpoint_url, retry_seconds=settings.storage_retry_seconds
    )
    try:
        data = source.get(key)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise SpecError(f"{field}: {exc}") from None
    finally:
        source.close()
    if data is None:
        raise SpecError(f"{field}: {ref} does not exist")
    return data


def decode(field: str, data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            if probe.size[0] * probe.size[1] > max_pixels:
                raise SpecError(f"{field}: {probe.size[0]}x{probe.size[1]} is over the {max_pixels}-pixel cap")
            probe.verify()  # catches truncated and corrupt files without decoding them twice
            image = Image.open(io.BytesIO(data))
            image.load()
    except SpecError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise SpecError(f"{field}: not a readable PNG, JPEG or WebP image ({exc})") from None
    return image
