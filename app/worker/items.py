"""What flows through a stage runner: input items, the outputs a stage returns, and its failures.

An :class:`Item` is one input record as a stage saw it, live from Kafka or replayed from a
quarantine; it carries what a dead letter must keep (the raw bytes, where it came from, the trace
context) and nothing of Faust's beyond an opaque reference to the record it came from.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context

from schemas.events import Event, EventBase

# A stage's output: (topic suffix from the registry, key, event). The runner encodes and sends it.
Output = tuple[str, bytes, EventBase]
# What the runner hands the producer: (full topic name, key, value, trace context of its span).
Outgoing = tuple[str, bytes | None, bytes | None, Context | None]
# A stage's work on one event; ``redriven`` is True when an operator's redrive replays it.
Handler = Callable[[Event, bool], Awaitable[list[Output]]]


class StageError(Exception):
    """A failure processing one event. ``error_class`` is permanent (retrying the same input cannot
    help: wrong event type, unknown tenant) or transient (it might succeed later)."""

    def __init__(
        self,
        message: str,
        error_class: str = "permanent",
        kind: str = "stage_error",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.kind = kind
        self.attempts = attempts


class DeadLetter(Exception):
    """Raised inside the runner to route the current item to the DLQ."""

    def __init__(self, error_class: str, kind: str, message: str, attempts: int) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.kind = kind
        self.message = message
        self.attempts = attempts


TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(frozen=True)
class Item:
    """One input record as the stage saw it: live from Kafka, or replayed from the quarantine.

    ``record`` is the transport's own record (a Faust event), kept so that table writes can be
    routed to its partition's changelog; a replayed item has none."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    timestamp: float | None
    attempts: int = 0  # failed attempts before this one (kept across redrives)
    first_failure_at: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()  # trace context: a replay joins the original trace
    record: Any = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": _b64(self.key),
            "value": _b64(self.value),
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "attempts": self.attempts,
            "first_failure_at": self.first_failure_at,
            "headers": [[k, v.decode()] for k, v in self.headers],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Item:
        return cls(
            key=_unb64(data["key"]),
            value=_unb64(data["value"]) or b"",
            topic=data["topic"],
            partition=data["partition"],
            offset=data["offset"],
            timestamp=data["timestamp"],
            attempts=data["attempts"],
            first_failure_at=data["first_failure_at"],
            headers=tuple((k, v.encode()) for k, v in data.get("headers", ())),
        )


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data)
