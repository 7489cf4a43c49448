"""Links to a job's files, and the route that serves them from a `file://` storage.

S3: a presigned GET that lasts `RENDER_SIGNED_URL_SECONDS`. A local directory: `/v1/files/<name>`, served here
(read scope) from under the storage root only, and to a tenant's key only from its own jobs' folders (`<tenant>@<id>/`,
`producer.keys.image_object`); the `default` tenant's keys, the operator's, read every file.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import FileResponse

from producer.errors import StorageError
from service.deps import LinkReader, Service
from service.errors import ApiError, ErrorResponse
from worker.storage import LocalStorage
from worker.storage.base import check_name

FILES_PATH = "/v1/files"

router = APIRouter(tags=["files"])


def link(service: Service, url: str) -> str:
    """A URL a client can GET for the stored object `url`; a URL outside the storage is returned as it is."""
    storage = service.storage
    name = storage.name_of(url)
    if name is None:
        return url
    if isinstance(storage, LocalStorage):
        return f"{FILES_PATH}/{quote(name)}"
    return storage.link(name, index_name=name, expires=service.settings.signed_url_seconds)


@router.get(
    FILES_PATH + "/{name:path}",
    response_class=FileResponse,
    responses={404: {"model": ErrorResponse}},
    summary="A stored file (file:// storage only)",
)
def get_file(name: str, service: LinkReader) -> FileResponse:
    storage = service.storage
    if not isinstance(storage, LocalStorage):
        raise ApiError(404, "not_found", "files are in S3; use the signed links a job's `files` give")
    try:
        check_name(name)
    except StorageError as exc:
        raise ApiError(404, "not_found", str(exc), field="path") from None
    path = Path(storage.root, *name.split("/")).resolve()
    if not path.is_relative_to(storage.root) or not path.is_file() or not _readable(service, name):
        raise ApiError(404, "not_found", f"no file {name!r} in storage")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)


def _readable(service: Service, name: str) -> bool:
    """Whether the request's tenant may read the object `name`: one in the folder of a job it may read (named by
    the job's id, `<tenant>@<id>/`; every job for the default tenant). Answered as a missing file otherwise, so no
    other tenant's file is told from one that never was."""
    return service.client.owns(name.partition("/")[0])
