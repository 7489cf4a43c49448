"""What every route needs: the one `Service` of the app (client, storage, keys), and the key checks.

A request acts as its key's tenant: the routes get the `Service` with a client that submits and reads as that
tenant (`RenderClient.as_tenant`, sharing the connections), so another tenant's job is unknown to it (404, as an
unknown id). The `default` tenant's keys are the farm operator's: they read and cancel every tenant's job (what
`RenderClient.owns` allows), while listings and batches stay per tenant. Without keys (loopback only), requests act
as the service's own RENDER_TENANT, `default` unless set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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

    def acting_as(self, tenant: str | None) -> Service:
        """These parts with the client acting as `tenant` (None: as the service's own client)."""
        if tenant is None or tenant == self.client.tenant:
            return self
        return replace(self, client=self.client.as_tenant(tenant))


def service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found


def _as_key(found: Service, authorization: str | None, *, write: bool) -> Service:
    """The service as the request's key: checked (401, 403), then acting as the key's tenant."""
    return found.acting_as(found.keys.tenant(found.keys.check(authorization, write=write)))


def reader(request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Service:
    """The service, for a request that only reads (any valid key)."""
    return _as_key(service(request), authorization, write=False)


def writer(request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Service:
    """The service, for a request that changes something (a full-scope key)."""
    return _as_key(service(request), authorization, write=True)


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
    return _as_key(found, authorization, write=False)


Reader = Annotated[Service, Depends(reader)]
LinkReader = Annotated[Service, Depends(link_reader)]
Writer = Annotated[Service, Depends(writer)]
