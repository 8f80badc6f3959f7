"""The one place events become bytes and bytes become events (orjson + pydantic, at the edge only).

Decoding is strict: bytes that are not JSON, JSON that is not a valid event, and a schema_version this
build does not know all raise :class:`PoisonEvent`, which the stage agents route to their DLQ. Older
schema versions are upgraded by the upcasters registered in :data:`UPCASTERS` before validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas.events import SCHEMA_VERSION, Event, EventBase

_EVENT = TypeAdapter(Event)

# (event_type, from_version) -> function turning that version's dict into the next version's dict.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}

# The integers orjson writes: signed and unsigned 64-bit. It refuses others instead of writing them.
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
# How deep free-form JSON may nest (orjson refuses a document nested 255 levels deep, and an event
# wraps a report's attributes in a few levels of its own).
MAX_FREE_FORM_DEPTH = 32


class PoisonEvent(ValueError):
    """Bytes that can never become a valid event, whatever the retry. ``kind`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Unencodable(NamedTuple):
    """A value inside free-form JSON that the codec cannot write exactly: where, what kind, why."""

    loc: tuple[str | int, ...]
    type: str
    msg: str
    value: Any


def unencodable(value: Any, limit: int = 20) -> list[Unencodable]:
    """The first ``limit`` places in the JSON ``value`` that :func:`encode` would refuse or change.

    Requests carry free-form JSON (a report's ``attributes``) that Python's JSON parser reads
    without bounds, so they are checked against what orjson writes exactly, before they reach an
    event: integers within JSON_INT_MIN .. JSON_INT_MAX, finite numbers (orjson would write NaN
    and Infinity as null), strings and keys without lone surrogates (not UTF-8), and at most
    MAX_FREE_FORM_DEPTH levels of arrays and objects."""
    found: list[Unencodable] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack and len(found) < limit:
        loc, item = stack.pop()
        problem = _problem(item, len(loc))
        if problem is not None:
            found.append(Unencodable(loc, *problem, item))
            continue
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not _is_utf8(key):
                    shown = key.encode(errors="backslashreplace").decode()
                    found.append(Unencodable((*loc, shown), *_SURROGATE_KEY, key))
                else:
                    stack.append(((*loc, key), child))
        elif isinstance(item, list | tuple):
            stack.extend(((*loc, i), child) for i, child in reversed(list(enumerate(item))))
    return found[:limit]


_SURROGATE_KEY = ("string_unicode", "The key is not valid Unicode text (it holds a lone surrogate)")


def _problem(item: Any, depth: int) -> tuple[str, str] | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        if JSON_INT_MIN <= item <= JSON_INT_MAX:
            return None
        return (
            "int_out_of_range",
            f"Integers must lie between {JSON_INT_MIN} and {JSON_INT_MAX} (64 bits); send a "
            "larger number as a string",
        )
    if isinstance(item, float) and not math.isfinite(item):
        return ("finite_number", "Numbers must be finite (not NaN or Infinity)")
    if isinstance(item, str) and not _is_utf8(item):
        return ("string_unicode", "The text is not valid Unicode (it holds a lone surrogate)")
    if isinstance(item, dict | list | tuple) and depth >= MAX_FREE_FORM_DEPTH:
        return (
            "too_deep",
            f"Free-form values may nest at most {MAX_FREE_FORM_DEPTH} arrays or objects deep",
        )
    return None


def _is_utf8(text: object) -> bool:
    if not isinstance(text, str):
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


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
