"""Dependencies of the routes, as ``Annotated`` aliases (SettingsDep, TenantDep, ProducerDep, ...).

The process-wide objects (settings, API keys, producer, reader, idempotency cache) are built once by the
lifespan in ``api.main`` and kept in a :class:`Runtime` on ``app.state``; the functions here hand them
to the routes, and tests replace them with ``app.dependency_overrides``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader

from api.errors import ApiProblem
from api.idempotency import HEADER as IDEMPOTENCY_HEADER
from api.idempotency import MAX_KEY_LENGTH, Idempotency, parse_key
from api.producer import EventSender
from api.reader import ExceptionReader
from app.settings import Settings
from schemas.config import ApiKeys


@dataclass
class Runtime:
    settings: Settings
    api_keys: ApiKeys
    producer: EventSender
    reader: ExceptionReader
    idempotency: Idempotency


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ApiProblem(503, "The API is still starting; try again in a moment.")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_producer(runtime: RuntimeDep) -> EventSender:
    return runtime.producer


def get_reader(runtime: RuntimeDep) -> ExceptionReader:
    return runtime.reader


def get_idempotency(runtime: RuntimeDep) -> Idempotency:
    return runtime.idempotency


api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="The tenant's API key; the tenant of every request is the key's tenant.",
    auto_error=False,
)


def get_tenant(
    runtime: RuntimeDep, api_key: Annotated[str | None, Security(api_key_header)]
) -> str:
    """The tenant of the request's X-API-Key, or 401."""
    if not api_key:
        raise ApiProblem(
            401,
            "The X-API-Key header is missing; send your tenant's API key in it.",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )
    tenant = runtime.api_keys.tenant_for(api_key)
    if tenant is None:
        raise ApiProblem(
            401,
            "The API key in X-API-Key is not valid; check it, or ask for a new one.",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )
    return tenant


def get_idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            description=(
                f"Makes the request safe to retry: 1 to {MAX_KEY_LENGTH} printable ASCII characters "
                "(a UUID is a good choice), optionally as a quoted string. Scoped to the tenant."
            ),
        ),
    ] = None,
) -> str | None:
    return None if idempotency_key is None else parse_key(idempotency_key)


SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
ProducerDep = Annotated[EventSender, Depends(get_producer)]
ReaderDep = Annotated[ExceptionReader, Depends(get_reader)]
IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]
IdempotencyKeyDep = Annotated[str | None, Depends(get_idempotency_key)]
