"""Dependencies of the routes, as ``Annotated`` aliases (SettingsDep, ViewerCaller, ProducerDep, ...).

The process-wide objects (settings, API keys, producer, reader, idempotency cache) are built once by the
lifespan in ``api.main`` and kept in a :class:`Runtime` on ``app.state``; the functions here hand them
to the routes, and tests replace them with ``app.dependency_overrides``.

Every tenant route takes one of ``IngestCaller``, ``ViewerCaller``, ``OperatorCaller`` or
``AdminCaller``: the :class:`~schemas.config.Caller` (tenant, key name, role) of the request's
X-API-Key, once its role allows the route. A missing or unknown key answers 401, a known key whose role
does not allow the route 403 naming the role needed; a client address that has used up its budget of
401s (``api.limits.AuthFailureThrottle``) gets 429 with Retry-After, whatever key it sends. Roles: a
producer key only reports exceptions; viewer < operator < admin, each allowed what the one before is;
an admin may also report. The OpenAPI
document states each route's role from these dependencies (:func:`required_role`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import APIKeyHeader
from starlette.routing import BaseRoute

from api.errors import ApiProblem
from api.idempotency import HEADER as IDEMPOTENCY_HEADER
from api.idempotency import MAX_KEY_LENGTH, Idempotency, parse_key
from api.limits import AuthFailureThrottle, IngestLimiter
from api.producer import EventSender
from api.reader import ExceptionReader
from app.settings import Settings
from app.telemetry import metrics
from schemas.config import ApiKeys, Caller, Role


@dataclass
class Runtime:
    settings: Settings
    api_keys: ApiKeys
    producer: EventSender
    reader: ExceptionReader
    idempotency: Idempotency
    ingest_limits: IngestLimiter
    auth_throttle: AuthFailureThrottle


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


def get_ingest_limits(runtime: RuntimeDep) -> IngestLimiter:
    return runtime.ingest_limits


api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="An API key of the tenant: it decides the tenant of every request and, by its role, "
    "which routes the request may use.",
    auto_error=False,
)

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}
DENIAL_REASONS = ("missing_key", "unknown_key", "role", "auth_throttled")


async def get_caller(
    request: Request,
    runtime: RuntimeDep,
    api_key: Annotated[str | None, Security(api_key_header)],
) -> Caller:
    """Who sends the request's X-API-Key (tenant, key name, role), or 401; or 429 when the
    client address has used up its budget of 401s (checked first, so a throttled address learns
    nothing about the key it sends).

    Denials are counted in ``sluice_api_denials_total{reason}``, not logged: a client retrying with
    a bad key would otherwise fill the log. (An address running out of its budget is logged once.)
    Async, so that it runs on the event loop, where the throttle's buckets live.
    """
    address = request.client.host if request.client is not None else "unknown"
    throttle = runtime.auth_throttle
    wait = throttle.waiting(address)
    if wait is not None:
        metrics.api_denied("auth_throttled")
        raise ApiProblem(
            429,
            f"Too many requests from {address} failed authentication (the budget is "
            f"{throttle.per_minute} a minute), so requests from it are refused for now whatever "
            f"their key. Check the X-API-Key your client sends, then retry after {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )
    if not api_key:
        await throttle.failed(address)
        metrics.api_denied("missing_key")
        raise ApiProblem(
            401,
            "The X-API-Key header is missing; send an API key of your tenant in it.",
            headers=_WWW_AUTHENTICATE,
        )
    caller = runtime.api_keys.caller_for(api_key)
    if caller is None:
        await throttle.failed(address)
        metrics.api_denied("unknown_key")
        raise ApiProblem(
            401,
            "The API key in X-API-Key is not valid; check it, or ask an admin of your tenant for "
            "a new one.",
            headers=_WWW_AUTHENTICATE,
        )
    return caller


ROLE_NEEDS = {
    "producer": "the producer role (an admin key may use it too)",
    "viewer": "the viewer role or one above it (operator, admin)",
    "operator": "the operator role or the one above it (admin)",
    "admin": "the admin role",
}
"""What each role requirement accepts, as a phrase; used in the 403 detail and in the OpenAPI."""

_REQUIRED: dict[Callable[..., Caller], Role] = {}


def _requires(role: Role) -> Callable[..., Caller]:
    def require(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        if not caller.may(role):
            metrics.api_denied("role")
            only = ", which may only report exceptions" if caller.role == "producer" else ""
            raise ApiProblem(
                403,
                f"This route needs a key with {ROLE_NEEDS[role]}; the key {caller.key_name!r} has "
                f"the {caller.role} role{only}. Use a key with the {role} role, or ask an admin of "
                f"tenant {caller.tenant_id!r} for one.",
            )
        return caller

    require.__name__ = f"require_{role}"
    _REQUIRED[require] = role
    return require


require_producer = _requires("producer")
require_viewer = _requires("viewer")
require_operator = _requires("operator")
require_admin = _requires("admin")


@dataclass(frozen=True)
class RouteRole:
    method: str
    path: str
    role: Role | None  # None: the route needs no API key


def route_roles(routes: Sequence[BaseRoute]) -> list[RouteRole]:
    """The role each API route's dependencies require, by method and path (included routers
    walked the way FastAPI's own OpenAPI walks them).

    The OpenAPI document is built from this, so what it says is what the routes enforce.
    """
    found = []
    for context in iter_route_contexts(routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        role = _required_role(route.dependant)
        found += [
            RouteRole(m, str(context.path_format), role) for m in sorted(context.methods or ())
        ]
    return found


def _required_role(dependant: Dependant) -> Role | None:
    pending = list(dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if dependency.call in _REQUIRED:
            return _REQUIRED[dependency.call]
        pending += dependency.dependencies
    return None


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
IngestCaller = Annotated[Caller, Depends(require_producer)]
"""A producer or admin key: reporting exceptions."""
ViewerCaller = Annotated[Caller, Depends(require_viewer)]
"""A viewer, operator or admin key: every read of the tenant's data."""
OperatorCaller = Annotated[Caller, Depends(require_operator)]
"""An operator or admin key: approve, reject, redrive, discard, quarantine actions."""
AdminCaller = Annotated[Caller, Depends(require_admin)]
"""An admin key: configuration changes."""
ProducerDep = Annotated[EventSender, Depends(get_producer)]
ReaderDep = Annotated[ExceptionReader, Depends(get_reader)]
IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]
IngestLimitsDep = Annotated[IngestLimiter, Depends(get_ingest_limits)]
IdempotencyKeyDep = Annotated[str | None, Depends(get_idempotency_key)]
