"""What every route needs: the one `Service` of the app (client, storage, keys), and the key checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

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


Reader = Annotated[Service, Depends(reader)]
Writer = Annotated[Service, Depends(writer)]
