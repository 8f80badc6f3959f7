"""Idempotency-Key for POST /v1/exceptions (IETF httpapi draft "The Idempotency-Key HTTP Header Field").

A key is scoped to the tenant. The exception id is derived from it,
``uuid5(SLUICE_NAMESPACE, f"{tenant}:idem:{window}:{key}")`` with ``window = time // ttl``, so a retry
(from this API process or another one) produces the very same event id, and the pipeline's intake drops
the redelivered event. Before producing, :meth:`Idempotency.claim` looks the key up:

1. in this process's cache (kept for ``ttl``): same body -> replay the first answer; a different body
   -> 422; the first request still in flight -> 409;
2. else through the workers' read path, for the ids of the current and the previous window (the
   ExceptionIngested event in the history holds the body's hash): same hash -> replay, different -> 422.
   When no worker answers, the request goes on: the derived id still keeps a retry from duplicating.

So a key expires between one and two ``ttl`` after its first use.

POST /v1/exceptions:batch uses the same protocol with its own keys (``scope="batch"``): the body hash
covers the whole batch, and each item's exception id is derived from the key and the item's index
(:func:`batch_exception_id`). Its first valid item gets the id derived from the key alone, so that
the workers can be asked about an earlier use of the key whatever the batch held; its
ExceptionIngested records the batch's hash.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from api.errors import ApiProblem
from api.reader import ExceptionReader, WorkerUnavailable
from schemas.events import SLUICE_NAMESPACE, ExceptionIngested

log = logging.getLogger("sluice.api.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# Bounds the per-process cache; the oldest keys go first (they expire first anyway).
MAX_CACHED_KEYS = 100_000


def parse_key(raw: str) -> str:
    """The key of an Idempotency-Key header value, or a 400 naming the header.

    The draft defines the value as a Structured Field string (``"..."``); a bare token is accepted too.
    """
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in value):
        raise ApiProblem(
            400,
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            f"(got {len(value)} characters"
            + ("" if value.isascii() and value.isprintable() else ", some not printable ASCII")
            + "). Use a random value such as a UUID, one per report, and reuse it on retries.",
        )
    return value


def derived_exception_id(tenant_id: str, key: str, window: int) -> str:
    return str(uuid.uuid5(SLUICE_NAMESPACE, f"{tenant_id}:idem:{window}:{key}"))


def batch_exception_id(tenant_id: str, key: str, window: int, index: int | None) -> str:
    """The exception id of a keyed batch's item ``index`` (None: the batch's first valid item)."""
    item = "" if index is None else f":{index}"
    return str(uuid.uuid5(SLUICE_NAMESPACE, f"{tenant_id}:idem-batch:{window}:{key}{item}"))


def _check_same_body(first_hash: str, this_hash: str) -> None:
    if first_hash != this_hash:
        raise ApiProblem(
            422,
            f"{HEADER} was already used with a different request body. Send the same body to "
            "retry a report, or use a new key for a new report.",
        )


@dataclass
class _Entry:
    request_hash: str
    exception_id: str
    state: Literal["in_flight", "done"]
    expires_at: float
    window: int
    resend: bool = False  # known from the workers only: this process has not sent it


@dataclass(frozen=True)
class Claim:
    """What to do with a request carrying a key: produce ``exception_id`` (``replay`` False), or
    answer the earlier request's 202 again (``replay`` True). ``window`` is the one its ids were
    derived in; ``resend`` is True when only the workers knew the earlier use (this process did
    not send it), so a batch sends its items again (same ids: the intake drops the copies)."""

    exception_id: str
    replay: bool
    window: int = 0
    resend: bool = False


class Idempotency:
    """The per-process cache of keys, and the claim/complete/release protocol around a produce."""

    def __init__(self, ttl_seconds: int, max_keys: int = MAX_CACHED_KEYS) -> None:
        self.ttl = ttl_seconds
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def _get(self, slot: tuple[str, str]) -> _Entry | None:
        now = time.monotonic()
        while self._entries:  # entries share one ttl, so the oldest expire first
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                break
            self._entries.popitem(last=False)
        return self._entries.get(slot)

    def _put(self, slot: tuple[str, str], entry: _Entry) -> None:
        self._entries[slot] = entry
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    async def claim(
        self,
        tenant_id: str,
        key: str,
        request_hash: str,
        reader: ExceptionReader,
        *,
        scope: str = "single",
    ) -> Claim:
        slot = _slot(tenant_id, key, scope)
        derive: Callable[[int], str] = (
            (lambda w: batch_exception_id(tenant_id, key, w, None))
            if scope == "batch"
            else (lambda w: derived_exception_id(tenant_id, key, w))
        )
        entry = self._get(slot)
        if entry is not None:
            _check_same_body(entry.request_hash, request_hash)
            if entry.state == "in_flight":
                raise ApiProblem(
                    409,
                    f"A request with this {HEADER} is still being processed; wait for its answer, "
                    "then retry with the same key to get it again.",
                )
            return Claim(entry.exception_id, replay=True, window=entry.window, resend=entry.resend)

        window = int(time.time() // self.ttl)
        exception_id = derive(window)
        # Claim the slot before the first await, so a concurrent request with this key sees it.
        expires_at = time.monotonic() + self.ttl
        self._put(slot, _Entry(request_hash, exception_id, "in_flight", expires_at, window))
        candidates = {derive(window - 1): window - 1, exception_id: window}
        try:
            earlier = await self._lookup(reader, tenant_id, key, list(candidates))
        except BaseException:
            self._entries.pop(slot, None)
            raise
        if earlier is None:
            return Claim(exception_id, replay=False, window=window)
        earlier_id, earlier_hash = earlier
        earlier_window = candidates[earlier_id]
        self._put(
            slot, _Entry(earlier_hash, earlier_id, "done", expires_at, earlier_window, resend=True)
        )
        _check_same_body(earlier_hash, request_hash)
        return Claim(earlier_id, replay=True, window=earlier_window, resend=True)

    def complete(self, tenant_id: str, key: str, *, scope: str = "single") -> None:
        """The claimed exception is on Kafka: later requests with this key replay its answer."""
        entry = self._entries.get(_slot(tenant_id, key, scope))
        if entry is not None:
            entry.state = "done"
            entry.resend = False

    def release(self, tenant_id: str, key: str, *, scope: str = "single") -> None:
        """The produce failed: forget the claim so that a retry tries again."""
        self._entries.pop(_slot(tenant_id, key, scope), None)

    async def _lookup(
        self, reader: ExceptionReader, tenant_id: str, key: str, candidates: list[str]
    ) -> tuple[str, str] | None:
        """(exception id, request hash) of an earlier use of the key the workers know, oldest first;
        None when they know none, or cannot be asked."""
        answers = await asyncio.gather(
            *(reader.get_exception(tenant_id, c) for c in candidates), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, WorkerUnavailable):
                log.info("cannot check %s against the workers (%s); producing", HEADER, answer)
                continue
            if isinstance(answer, BaseException):
                raise answer
            if answer is None:
                continue
            for entry in answer.history:
                if (
                    entry.event_type == ExceptionIngested.__name__
                    and entry.payload.get("idempotency_key") == key
                ):
                    return answer.state.exception_id, str(entry.payload.get("request_hash"))
        return None


def _slot(tenant_id: str, key: str, scope: str) -> tuple[str, str]:
    return (tenant_id, key if scope == "single" else f"{scope}\n{key}")
