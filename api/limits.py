"""Rate limits of the API: each tenant's ingest limit, and the budget of failed authentications per
client address.

Both are token buckets kept in this process's memory: N API processes allow N times the rate, and a
restart starts every bucket full (docs/operations.md, "Limits").

- :class:`IngestLimiter` holds a bucket per tenant with ``[limits] ingest_per_second`` in its file;
  each reported exception takes a token (a batch of N takes N, all or none). A tenant without
  limits has no bucket and is never refused.
- :class:`AuthFailureThrottle` holds a bucket per client address that has failed authentication
  (401): SLUICE_AUTH_FAILURES_PER_MINUTE failures at once, refilled at that many per minute. While an
  address's bucket is empty every request from it that needs a key is refused with 429, whatever its
  key: were a valid key let through, the answer would tell a guesser that the guess was right.

The bucket is aiolimiter's ``AsyncLimiter``: a leaky bucket "as a meter", which is the token bucket
(``max_rate`` is the burst and ``max_rate / time_period`` the rate), with ``has_capacity(amount)``
to ask without waiting. Of the libraries looked at, ``limits`` offers only fixed and moving windows,
and pyrate-limiter's buckets are sliding-window logs of items (a weight of N stores N entries);
neither is a token bucket. aiolimiter does not say how long until N tokens are back, so
:meth:`TokenBucket.take` works it out from ``has_capacity`` and the rate (see there).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping

from aiolimiter import AsyncLimiter

from schemas.config import LimitsConfig

log = logging.getLogger("sluice.api.limits")

# Addresses whose failed authentications are remembered at most; beyond it the oldest go first.
MAX_TRACKED_ADDRESSES = 100_000


class TokenBucket:
    """``burst`` tokens, refilled at ``per_second``; tokens are taken whole or not at all."""

    def __init__(self, per_second: float, burst: int) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError(
                f"a bucket needs a rate > 0 and a burst >= 1, got {per_second}, {burst}"
            )
        self.per_second = per_second
        self.burst = burst
        self._bucket = AsyncLimiter(max_rate=burst, time_period=burst / per_second)

    async def take(self, tokens: int) -> int | None:
        """Take ``tokens`` and answer None, or take nothing and answer the whole seconds (at least
        1) after which they would be there.

        ``tokens`` above ``burst`` can never be taken: ValueError (callers refuse such a request
        as too large instead, since waiting would not help).
        """
        if tokens > self.burst:
            raise ValueError(f"{tokens} tokens can never be taken from a bucket of {self.burst}")
        if self._bucket.has_capacity(tokens):
            # acquire() takes them without awaiting anything when the capacity is there, so no
            # other request runs between the check and the take.
            await self._bucket.acquire(tokens)
            return None
        return self._seconds_until(tokens)

    def waiting(self) -> int | None:
        """None when a token is there now, else the whole seconds until one is."""
        return None if self._bucket.has_capacity(1) else self._seconds_until(1)

    def full(self) -> bool:
        return self._bucket.has_capacity(self.burst)

    def _seconds_until(self, tokens: int) -> int:
        # In s seconds the bucket leaks s * per_second, so ``tokens`` fit then exactly when
        # ``tokens - s * per_second`` fit now: has_capacity() answers for any future second
        # without reading the bucket's private level. The least whole s >= 1 is found by
        # bisection; ceil(tokens / per_second) always fits, as the level never exceeds the burst.
        low, high = 1, max(1, math.ceil(tokens / self.per_second))
        while low < high:
            middle = (low + high) // 2
            if self._bucket.has_capacity(tokens - middle * self.per_second):
                high = middle
            else:
                low = middle + 1
        return low


class IngestLimiter:
    """Each limited tenant's bucket; tenants without ``[limits]`` (or without a file) are not
    limited."""

    def __init__(self, limits: Mapping[str, LimitsConfig]) -> None:
        self.limits = {tenant: lim for tenant, lim in limits.items() if lim.limited}
        self._buckets = {
            tenant: TokenBucket(lim.ingest_per_second or 0, lim.burst)
            for tenant, lim in self.limits.items()
        }

    def limit_of(self, tenant_id: str) -> LimitsConfig | None:
        return self.limits.get(tenant_id)

    async def take(self, tenant_id: str, reports: int) -> int | None:
        """Charge ``reports`` to the tenant: None when allowed, else the seconds to wait."""
        bucket = self._buckets.get(tenant_id)
        return None if bucket is None else await bucket.take(reports)


class AuthFailureThrottle:
    """Failed authentications per client address: ``per_minute`` at once, refilled at
    ``per_minute`` a minute; 0 turns the throttle off."""

    def __init__(self, per_minute: int, max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        # By last failure, oldest first: the first ones are the likeliest to have refilled.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def waiting(self, address: str) -> int | None:
        """None when ``address`` may try a key now, else the seconds until it may."""
        bucket = self._buckets.get(address)
        return None if bucket is None else bucket.waiting()

    async def failed(self, address: str) -> None:
        """``address`` sent a missing or unknown key: it takes one of its tokens."""
        if self.per_minute <= 0:
            return
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            self._forget_refilled()
            bucket = TokenBucket(self.per_minute / 60, self.per_minute)
        self._buckets[address] = bucket
        await bucket.take(1)  # waiting() was None just before, so the token is there
        if bucket.waiting() is not None:
            log.warning(
                "%s used up its budget of %d failed authentications a minute: its requests get "
                "429 until the budget refills (SLUICE_AUTH_FAILURES_PER_MINUTE)",
                address,
                self.per_minute,
            )

    def _forget_refilled(self) -> None:
        while self._buckets:
            address, oldest = next(iter(self._buckets.items()))
            if not oldest.full() and len(self._buckets) < self.max_addresses:
                break
            del self._buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)
