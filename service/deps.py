"""What every route needs: the one `Service` of the app (client, storage, keys), and the key checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from producer.client import RenderClient
from service.auth import Keys
from service.settings import ServiceSettings
from worker.storage import Storage


@dataclass
class Service:
    """The process's parts, made once by `create_app` and shared by every request (all thread-safe)."""

    settings: ServiceSettings
    client: RenderClient
    storage: Storage
    keys: Keys


def service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found


def reader(request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Service:
    """The service, for a request that only reads (any valid key)."""
    found = service(request)
    found.keys.check(authorization, write=False)
    return found


def writer(request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Service:
    """The service, for a request that changes something (a full-scope key)."""
    found = service(request)
    found.keys.check(authorization, write=True)
    return found


def link_reader(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    access_token: Annotated[
        str | None,
        Query(description="the API key, where the client cannot send a header (EventSource, <img>); redacted in logs"),
    ] = None,
) -> Service:
    """The service, for a read a browser makes by URL (an event stream, a file): the key may come as
    `?access_token=`, since EventSource and <img> send no Authorization header."""
    found = service(request)
    if authorization is None and access_token:
        authorization = f"Bearer {access_token}"
    found.keys.check(authorization, write=False)
    return found


Reader = Annotated[Service, Depends(reader)]
LinkReader = Annotated[Service, Depends(link_reader)]
Writer = Annotated[Service, Depends(writer)]
