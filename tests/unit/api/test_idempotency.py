"""The Idempotency-Key pieces on their own: key parsing, derived ids, the per-process cache."""

from __future__ import annotations

import uuid

import pytest

from api.errors import ApiProblem
from api.idempotency import Idempotency, derived_exception_id, parse_key
from schemas.events import SLUICE_NAMESPACE
from tests.unit.api.conftest import FakeReader


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"say \\"hi\\""', 'say "hi"'),
        ("with spaces inside", "with spaces inside"),
        ("x" * 255, "x" * 255),
    ],
)
def test_parse_key_accepts_tokens_and_quoted_strings(raw: str, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize("raw", ["", "  ", "x" * 256, "new\nline", "\u00e9t\u00e9", '""'])
def test_parse_key_refuses_with_a_400_naming_the_header(raw: str) -> None:
    with pytest.raises(ApiProblem) as caught:
        parse_key(raw)
    assert caught.value.status == 400
    assert "Idempotency-Key" in caught.value.detail


def test_derived_id_is_per_tenant_window_and_key() -> None:
    a = derived_exception_id("acme", "k", 100)
    assert a == str(uuid.uuid5(SLUICE_NAMESPACE, "acme:idem:100:k"))
    assert a == derived_exception_id("acme", "k", 100)
    assert (
        len(
            {
                a,
                *(
                    derived_exception_id(*v)
                    for v in [("globex", "k", 100), ("acme", "k", 101), ("acme", "j", 100)]
                ),
            }
        )
        == 4
    )


async def test_claim_complete_replay() -> None:
    idem = Idempotency(ttl_seconds=3600)
    reader = FakeReader()
    first = await idem.claim("acme", "k", "h1", reader)
    assert not first.replay
    with pytest.raises(ApiProblem) as in_flight:
        await idem.claim("acme", "k", "h1", reader)
    assert in_flight.value.status == 409
    idem.complete("acme", "k")
    again = await idem.claim("acme", "k", "h1", reader)
    assert again == type(again)(first.exception_id, replay=True, window=first.window)
    with pytest.raises(ApiProblem) as other_body:
        await idem.claim("acme", "k", "h2", reader)
    assert other_body.value.status == 422


async def test_release_lets_a_retry_claim_again() -> None:
    idem = Idempotency(ttl_seconds=3600)
    first = await idem.claim("acme", "k", "h1", FakeReader())
    idem.release("acme", "k")
    second = await idem.claim("acme", "k", "h1", FakeReader())
    assert second == first  # the same derived id, not a replay


async def test_cache_is_bounded_oldest_first() -> None:
    idem = Idempotency(ttl_seconds=3600, max_keys=2)
    reader = FakeReader(down=True)
    for key in ("a", "b", "c"):
        await idem.claim("acme", key, "h", reader)
        idem.complete("acme", key)
    assert (await idem.claim("acme", "c", "h", reader)).replay
    assert not (await idem.claim("acme", "a", "h", reader)).replay  # evicted: claimed anew


async def test_expired_entries_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("api.idempotency.time.monotonic", lambda: now[0])
    idem = Idempotency(ttl_seconds=60)
    reader = FakeReader(down=True)
    await idem.claim("acme", "k", "h1", reader)
    idem.complete("acme", "k")
    now[0] += 59
    with pytest.raises(ApiProblem):
        await idem.claim("acme", "k", "h2", reader)
    now[0] += 2
    assert not (await idem.claim("acme", "k", "h2", reader)).replay
