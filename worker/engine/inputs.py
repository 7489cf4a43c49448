"""Input images (img2img, inpaint, ControlNet): fetched, capped, decoded and checked before any GPU work.

Accepted references: `s3://bucket/key` (the worker's S3 endpoint and credentials), `file:///path` under
one of `RENDER_INPUT_ROOTS`, or inline `data:image/<png|jpeg|webp>;base64,...`. Every failure is a
`SpecError` naming the field, except S3 that cannot be reached: retried with backoff for
`RENDER_STORAGE_RETRY_SECONDS`, as outputs are, then `StorageUnavailable`.

`RENDER_INPUT_ROOTS` lists directories for `file://` inputs and `s3://bucket/prefix/` entries for `s3://`
inputs. With no `s3://` entry, any bucket the worker's credentials can read is allowed, as it was before the
setting took them. No input is read past `RENDER_MAX_INPUT_BYTES`: a file's or an object's size is checked
first (an S3 HEAD), and the read itself stops one byte past the cap in case the object changed meanwhile.
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
from worker.storage.base import check_name

S3 = "s3://"


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
        raise _too_large(field, len(data), cap)
    return data


def _too_large(field: str, size: int | None, cap: int) -> SpecError:
    shown = f"{size} bytes" if size is not None else f"more than {cap} bytes"
    return SpecError(
        f"{field}: the image is {shown}, over the {cap}-byte cap (RENDER_MAX_INPUT_BYTES); "
        "send a smaller image or raise the cap"
    )


def _read_file(field: str, ref: str, settings: WorkerSettings) -> bytes:
    parsed = urlparse(ref)
    if parsed.netloc not in ("", "localhost"):
        raise SpecError(f"{field}: file:// URLs name no host; use file:///absolute/path")
    path = Path(unquote(parsed.path)).resolve()
    roots = [Path(root).resolve() for root in settings.input_roots if not root.startswith(S3)]
    if not any(path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none: RENDER_INPUT_ROOTS lists no directory"
        raise SpecError(
            f"{field}: {path} is outside the allowed input roots ({allowed}); use a file under one of them "
            "or add its directory to RENDER_INPUT_ROOTS"
        )
    cap = settings.max_input_bytes
    try:
        size = path.stat().st_size
        if size > cap:
            raise _too_large(field, size, cap)
        with path.open("rb") as file:
            data = file.read(cap + 1)  # the file may have grown since
        if len(data) > cap:
            raise _too_large(field, None, cap)
        return data
    except FileNotFoundError:
        raise SpecError(f"{field}: {path} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"{field}: {path} is a directory, not an image") from None
    except PermissionError:
        raise SpecError(f"{field}: {path} cannot be read (permission denied)") from None


def _read_s3(field: str, ref: str, settings: WorkerSettings) -> bytes:
    parsed = urlparse(ref)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise SpecError(f"{field}: {ref!r} needs a bucket and a key (s3://bucket/key)")
    try:
        check_name(key)
    except StorageError as exc:
        raise SpecError(f"{field}: {exc}") from None
    _check_s3_root(field, ref, bucket, key, settings.input_roots)
    # An outage is retried for the budget outputs get, then fails as storage (the spec is not at fault);
    # a missing bucket or refused access is the spec's reference, named by its field.
    source = _InputBucket(bucket, endpoint_url=settings.s3_endpoint_url, retry_seconds=settings.storage_retry_seconds)
    try:
        data = source.read(key, settings.max_input_bytes)
    except _OverCap as exc:
        raise _too_large(field, exc.size, settings.max_input_bytes) from None
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise SpecError(f"{field}: {exc}") from None
    finally:
        source.close()
    if data is None:
        raise SpecError(f"{field}: {ref} does not exist")
    return data


def _check_s3_root(field: str, ref: str, bucket: str, key: str, roots: list[str]) -> None:
    allowed = [root for root in roots if root.startswith(S3)]
    if not allowed:
        return  # no s3:// entry: any bucket, as before RENDER_INPUT_ROOTS took s3:// entries
    for root in allowed:
        root_bucket, _, prefix = root.removeprefix(S3).partition("/")
        prefix = prefix.strip("/")
        if bucket == root_bucket and (not prefix or key.startswith(prefix + "/")):
            return
    raise SpecError(
        f"{field}: {ref} is outside the allowed input roots ({', '.join(allowed)}); use an input under one of them "
        "or add its bucket or prefix to RENDER_INPUT_ROOTS"
    )


class _OverCap(Exception):
    """Raised when an object holds more bytes than the cap (`size` None: how many more is not known)."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


class _InputBucket(S3Storage):
    """The bucket an input comes from, read no further than a cap (with `S3Storage`'s retries and errors)."""

    def read(self, key: str, cap: int) -> bytes | None:
        """The object's bytes; None when there is none; `_OverCap` when it holds more than `cap` bytes."""
        return self._retrying(lambda: self._read(key, cap))

    def _read(self, key: str, cap: int) -> bytes | None:
        try:
            size = self._size(key)
            if size is not None and size > cap:
                raise _OverCap(size)
            if size == 0:
                return b""  # a range of an empty object is refused; the decoder names the problem
            answer = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{cap}")
            body, data = answer["Body"], b""
            try:
                while len(data) <= cap and (chunk := body.read(cap + 1 - len(data))):
                    data += chunk
            finally:
                body.close()  # a server that ignored the range sends the rest to a closed connection
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._error("read", key, exc) from exc
        if len(data) > cap:  # it grew since its HEAD
            total = answer.get("ContentRange", "").rpartition("/")[2]
            raise _OverCap(int(total) if total.isdigit() else None)
        return data

    def _size(self, key: str) -> int | None:
        """The size HEAD reports; None when it finds nothing (the GET tells a missing key from a missing bucket)."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise


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
