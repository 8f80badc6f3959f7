"""The one place events become bytes and bytes become events (orjson + pydantic, at the edge only).

Decoding is strict: bytes that are not JSON, JSON that is not a valid event, and a schema_version this
build does not know all raise :class:`PoisonEvent`, which the stage agents route to their DLQ. Older
schema versions are upgraded by the upcasters registered in :data:`UPCASTERS` before validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas.events import SCHEMA_VERSION, Event, EventBase

_EVENT = TypeAdapter(Event)

# (event_type, from_version) -> function turning that version's dict into the next version's dict.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class PoisonEvent(ValueError):
    """Bytes that can never become a valid event, whatever the retry. ``kind`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encode(event: EventBase) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def decode(data: bytes) -> Event:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PoisonEvent("malformed", f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise PoisonEvent("invalid", f"an event is a JSON object, got {type(raw).__name__}")
    raw = upcast(raw)
    try:
        return _EVENT.validate_python(raw)
    except ValidationError as exc:
        raise PoisonEvent("invalid", f"not a valid event: {_errors(exc)}") from exc


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version < 1:
        raise PoisonEvent("invalid", f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise PoisonEvent(
            "unknown_schema_version",
            f"schema_version {version} is newer than this build understands ({SCHEMA_VERSION}); "
            "upgrade Sluice, then redrive the event",
        )
    event_type = str(raw.get("event_type"))
    while version < SCHEMA_VERSION:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise PoisonEvent(
                "unknown_schema_version",
                f"no upcaster from {event_type} schema_version {version} to {version + 1}",
            )
        raw = {**step(raw), "schema_version": version + 1}
        version += 1
    return raw


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
    )
