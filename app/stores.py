"""The state the stages keep, behind two small protocols so the cores never know where it lives.

A stage remembers which input event ids it has handled (:class:`ProcessedStore`, the duplicate filter
for redelivered messages), and the tool stage remembers which tool steps have completed
(:class:`agents.tool.Ledger`, implemented here by :class:`MappingLedger`, so a redelivered plan
replays results instead of calling a tool twice).

Both implementations here are thin layers over any string-keyed mapping of bytes: a plain ``dict`` in
unit tests, a ``rocksdict.Rdict`` for a local RocksDB store, or a Faust table (a changelogged
MutableMapping) in the worker. Values are compact orjson documents that keep the time of the write, so
:meth:`expire` can bound the growth of a store that would otherwise remember every event forever.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import orjson
from pydantic import ValidationError

from schemas.events import StepResult


class BytesMapping(Protocol):
    """The part of ``MutableMapping[str, bytes]`` the stores use; dict, Rdict and Faust tables fit."""

    def __getitem__(self, key: str, /) -> Any: ...

    def __setitem__(self, key: str, value: bytes, /) -> None: ...

    def __delitem__(self, key: str, /) -> None: ...

    def __contains__(self, key: object, /) -> bool: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...


def stored(mapping: Mapping[Any, Any] | BytesMapping, key: Any) -> Any:
    """``mapping.get(key)`` for keys that are mostly absent (quarantines, first reports, new
    exceptions): a Faust table answers a missing key by raising KeyError through several frames,
    which a profile of the worker put among its ten costliest lines, while ``in`` answers it with
    one lookup. A key that is there costs two lookups instead of one."""
    return mapping[key] if key in mapping else None  # noqa: SIM401 - the point, see above


class ProcessedStore(Protocol):
    """Which input event ids a stage has already handled."""

    def seen(self, event_id: str) -> bool: ...

    def mark(self, event_id: str, at: datetime) -> None: ...

    def expire(self, before: datetime) -> int:
        """Forget ids marked before ``before``; return how many were forgotten."""
        ...


def _epoch(at: datetime) -> float:
    # A naive datetime would be read as local time and shift every expiry by the UTC offset.
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(
            f"store timestamps must be timezone-aware (got naive {at.isoformat()}); "
            "pass datetime.now(UTC) or an event's occurred_at"
        )
    return at.astimezone(UTC).timestamp()


def _expire(mapping: BytesMapping, cutoff: float, stamp_of: Callable[[bytes], float]) -> int:
    # Collect first, delete after: RocksDB iterators and Faust tables must not change under a scan.
    old = [key for key, raw in mapping.items() if stamp_of(raw) < cutoff]
    for key in old:
        del mapping[key]
    return len(old)


class MappingProcessedStore:
    """A :class:`ProcessedStore` over a mapping; the value is the mark time in epoch seconds."""

    def __init__(self, mapping: BytesMapping) -> None:
        self._mapping = mapping

    def seen(self, event_id: str) -> bool:
        return event_id in self._mapping

    def mark(self, event_id: str, at: datetime) -> None:
        # Re-marking keeps the first time: a redelivery must not extend how long an id is kept,
        # and skipping the write saves a changelog message per duplicate on a Faust table.
        if event_id in self._mapping:
            return
        self._mapping[event_id] = orjson.dumps(_epoch(at))

    def expire(self, before: datetime) -> int:
        return _expire(self._mapping, _epoch(before), _processed_stamp)


def _processed_stamp(raw: bytes) -> float:
    return float(orjson.loads(raw))


class MappingLedger:
    """An :class:`agents.tool.Ledger` over a mapping; the value is ``{"t": epoch seconds, "r": StepResult}``."""

    def __init__(self, mapping: BytesMapping) -> None:
        self._mapping = mapping

    def _entry(self, key: str) -> dict[str, Any] | None:
        return orjson.loads(self._mapping[key]) if key in self._mapping else None

    def get(self, key: str) -> StepResult | None:
        raw = self._entry(key)
        if raw is None or _is_marker(raw):
            return None
        try:
            return StepResult.model_validate(raw["r"])
        except (KeyError, TypeError, ValidationError) as exc:
            raise ValueError(
                f"ledger entry {key!r} is not a stored step result ({exc}); "
                "the store holds data this version of Sluice did not write"
            ) from exc

    def put(self, key: str, result: StepResult, at: datetime) -> None:
        self._mapping[key] = orjson.dumps({"t": _epoch(at), "r": result.model_dump(mode="json")})

    def begin(self, key: str, at: datetime) -> None:
        self._mapping[key] = orjson.dumps({"t": _epoch(at), "r": None, "begun": True})

    def in_flight(self, key: str) -> datetime | None:
        raw = self._entry(key)
        if raw is None or not _is_marker(raw):
            return None
        return datetime.fromtimestamp(float(raw["t"]), UTC)

    def abandon(self, key: str) -> None:
        if self.in_flight(key) is not None:
            del self._mapping[key]

    def expire(self, before: datetime) -> int:
        return _expire(self._mapping, _epoch(before), _ledger_stamp)


def _is_marker(raw: Mapping[str, Any]) -> bool:
    """Whether a ledger entry is an in-flight marker (a call begun, no result recorded)."""
    return raw.get("r") is None and bool(raw.get("begun"))


def _ledger_stamp(raw: bytes) -> float:
    return float(orjson.loads(raw)["t"])


K = TypeVar("K")
V = TypeVar("V")


class Decoded(Generic[K, V]):
    """The latest values one agent wrote to a table that it alone writes, kept decoded (up to
    ``size``, least recently used out first), so that reading one back does not parse it again.

    Only that agent's writes change the table while its partitions stay put. A rebalance, or the
    table recovery after it, may bring in other values from the changelog, so everything is
    dropped whenever ``generation()`` (the worker's count of those) has moved on."""

    def __init__(self, size: int, generation: Callable[[], int]) -> None:
        self.size = size
        self.generation = generation
        self.values: OrderedDict[K, V] = OrderedDict()
        self.seen_generation = generation()

    def _current(self) -> OrderedDict[K, V]:
        now = self.generation()
        if now != self.seen_generation:
            self.values.clear()
            self.seen_generation = now
        return self.values

    def get(self, key: K) -> V | None:
        values = self._current()
        value = values.get(key)
        if value is not None:
            values.move_to_end(key)
        return value

    def discard(self, key: K) -> None:
        self._current().pop(key, None)

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        values = self._current()
        values[key] = value
        values.move_to_end(key)
        while len(values) > self.size:
            values.popitem(last=False)
