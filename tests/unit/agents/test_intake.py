"""Intake's pure core: normalization, fingerprints, and repeat windows."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import timedelta

import pytest

from agents.intake import (
    FingerprintGroup,
    fingerprint,
    group,
    group_key,
    intake,
    normalize_message,
)
from schemas.events import ExceptionAccepted, ExceptionFingerprinted, derive_event_id
from tests import factories
from tests.factories import NOW

WINDOW = 3600

# ------------------------------------------------------------------------------------ normalization

TOKEN_CASES = [
    # UUIDs, in any case, before their groups could look like hex ids.
    ("user 550e8400-e29b-41d4-a716-446655440000 failed", "user <uuid> failed"),
    ("USER 550E8400-E29B-41D4-A716-446655440000 FAILED", "user <uuid> failed"),
    ("trace={550e8400-e29b-41d4-a716-446655440000}", "trace={<uuid>}"),
    # Hex ids: at least 8 hex digits with a letter, whole tokens, or 0x-prefixed.
    ("request deadbeefcafe failed", "request <hex> failed"),
    ("req_ab12cd34ef failed", "req_<hex> failed"),
    ("sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b", "sha <hex>"),
    ("pointer 0x7ffe", "pointer <hex>"),
    ("short abc123 stays", "short abc123 stays"),
    ("not hex abc12345xyz", "not hex abc12345xyz"),
    # Numbers: integers, decimals, separators; a glued unit stays, a code glued to letters stays.
    ("order 100234 failed", "order <n> failed"),
    ("amount 1,234.50 eur", "amount <n> eur"),
    ("delta -12", "delta -<n>"),
    ("timed out after 30s", "timed out after <n>s"),
    ("hub ber-2 and order_77", "hub ber-<n> and order_<n>"),
    ("http2 error e1001", "http2 error e1001"),
    ("version 1.2.3 not v1.2.3", "version <n> not v1.2.3"),
    # Emails, before their digits or dots are touched.
    ("mail bob.smith+tag@example.co.uk now", "mail <email> now"),
    ("from user42@shop.example", "from <email>"),
    # ISO timestamps, before their numbers.
    ("at 2024-05-01T12:00:00Z", "at <ts>"),
    ("at 2024-05-01T12:00:00.123456+02:00 ok", "at <ts> ok"),
    ("at 2024-05-01 12:00:00 ok", "at <ts> ok"),
    ("on 2024-05-01.", "on <ts>."),
    ("at 12:00:00", "at <n>:<n>:<n>"),
    # IP addresses: v4 (a port becomes <n>), v6 full, compressed, loopback, v4-mapped.
    ("connect 10.0.0.1:5432 refused", "connect <ip>:<n> refused"),
    ("from 192.168.1.20.", "from <ip>."),
    ("host 2001:0db8:0000:0000:0000:ff00:0042:8329 down", "host <ip> down"),
    ("host fe80::1ff:fe23:4567:890a down", "host <ip> down"),
    ("bind [::1]:8080", "bind [<ip>]:<n>"),
    ("peer ::ffff:10.0.0.1 reset", "peer <ip> reset"),
    ("std::vector out of range", "std::vector out of range"),
    # Quoted strings; an apostrophe inside a word neither opens nor closes one.
    ("key 'abc' missing", "key <str> missing"),
    ('field "first name" invalid', "field <str> invalid"),
    ("can't load order's items", "can't load order's items"),
    ("error 'can't connect' again", "error <str> again"),
    ("empty '' value", "empty <str> value"),
    ("unclosed 'quote here", "unclosed 'quote here"),
    # Whitespace collapsed and stripped, text lowercased.
    ("  Many \t spaces\n\nHERE  ", "many spaces here"),
]


@pytest.mark.parametrize(("message", "expected"), TOKEN_CASES)
def test_normalize_replaces_each_token_class(message: str, expected: str) -> None:
    assert normalize_message(message) == expected


@pytest.mark.parametrize(("message", "expected"), TOKEN_CASES)
def test_normalize_is_idempotent_on_examples(message: str, expected: str) -> None:
    assert normalize_message(expected) == expected
    assert normalize_message(normalize_message(message)) == normalize_message(message)


def test_normalize_repeats_until_stable() -> None:
    # The number is replaced first in the first pass, which only then exposes the IPv6 address.
    assert normalize_message("12345::ab") == "<n><ip>"


def test_normalize_is_idempotent_on_generated_messages() -> None:
    """Random mixes of the characters the patterns care about, with a fixed seed (reproducible)."""
    fragments = [
        "a", "f", "x", "0", "1", "9", "12345678", "abcdef12", ".", ":", "::", "-", "_", "@",
        "'", '"', " ", "t", "z", "+", ",", "<", ">", "com", "10.0.0.1", "2024-01-02",
        "t12:00:00", "\n", "é", "0x", "n>", "<n",
    ]  # fmt: skip
    rng = random.Random(20250602)  # noqa: S311 (reproducible test data, not a secret)
    for _ in range(3000):
        message = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 25)))
        once = normalize_message(message)
        assert normalize_message(once) == once, message


def test_normalize_groups_messages_that_differ_only_in_volatile_tokens() -> None:
    first = "Payment 'pi_3N' for order 100234 failed at 2024-05-01T10:00:00Z from 10.0.0.7"
    second = 'payment "pi_9Q" for order 100999 failed at 2024-06-02T11:30:00Z from 10.0.0.8'
    assert normalize_message(first) == normalize_message(second)
    assert normalize_message("Card declined") != normalize_message("Card expired")


def test_normalize_keeps_a_long_message_of_unclosed_quotes() -> None:
    message = " 'a" * 3000
    assert normalize_message(message) == message.strip()


# --------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_releases() -> None:
    """Pinned: a change here regroups every stored exception, so it must be deliberate. The value
    is sha256 of the compact JSON array of the four fields (source and error type lowercased)."""
    fields = ["acme", "payments", "paymentdeclined", "card declined for order <n>"]
    expected = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()[:32]
    assert expected == "fcc8293336e71f898096f23b7a5c0aa2"
    assert (
        fingerprint("acme", "payments", "PaymentDeclined", "card declined for order <n>")
        == expected
    )


def test_fingerprint_is_32_hex_characters() -> None:
    value = fingerprint("acme", "payments", "PaymentDeclined", "card declined")
    assert len(value) == 32
    assert set(value) <= set("0123456789abcdef")


def test_fingerprint_ignores_case_of_source_and_error_type() -> None:
    assert fingerprint("acme", "Payments", "PAYMENTDECLINED", "m") == fingerprint(
        "acme", "payments", "paymentdeclined", "m"
    )


def test_fingerprint_separates_tenants() -> None:
    assert fingerprint("acme", "payments", "X", "m") != fingerprint("globex", "payments", "X", "m")


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("acme", "ab", "c", "m"), ("acme", "a", "bc", "m")),
        (("acme", "a\x1fb", "c", "m"), ("acme", "a", "b\x1fc", "m")),
        (("acme", "a", "b", 'c","d'), ("acme", "a", 'b","c', "d")),
    ],
)
def test_fingerprint_fields_cannot_bleed_into_each_other(
    left: tuple[str, str, str, str], right: tuple[str, str, str, str]
) -> None:
    assert fingerprint(*left) != fingerprint(*right)


# ------------------------------------------------------------------------------------------- intake


def test_intake_normalizes_and_fingerprints_the_report() -> None:
    event = factories.ingested(factories.make_report(message="Card declined for order 100234"))
    out = intake(event, None, NOW)
    assert isinstance(out, ExceptionFingerprinted)
    assert out.payload.normalized_message == "card declined for order <n>"
    assert out.payload.fingerprint == fingerprint(
        "acme", "payments", "PaymentDeclined", "card declined for order <n>"
    )
    assert out.payload.report == event.payload.report


def test_intake_reuses_the_known_fingerprint() -> None:
    event = factories.ingested(factories.make_report(message="A different wording this time"))
    out = intake(event, "f" * 32, NOW)
    assert out.payload.fingerprint == "f" * 32
    assert out.payload.normalized_message == "a different wording this time"


def test_intake_reports_of_one_problem_share_a_fingerprint() -> None:
    first = intake(factories.ingested(exception_id="exc-1"), None, NOW)
    other_order = factories.make_report(message="Card declined for order 999 (insufficient funds)")
    second = intake(factories.ingested(other_order, exception_id="exc-2"), None, NOW)
    assert first.payload.fingerprint == second.payload.fingerprint


def test_intake_propagates_the_envelope() -> None:
    event = factories.ingested(tenant_id="globex", exception_id="exc-42", sequence=1)
    out = intake(event, None, NOW + timedelta(seconds=5))
    assert out.event_id == derive_event_id(event.event_id, "intake")
    assert out.tenant_id == "globex"
    assert out.exception_id == "exc-42"
    assert out.sequence == 2
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert out.occurred_at == NOW + timedelta(seconds=5)


def test_intake_output_id_is_deterministic() -> None:
    event = factories.ingested()
    assert (
        intake(event, None, NOW).event_id == intake(event, None, NOW + timedelta(hours=1)).event_id
    )
    other = factories.ingested(event_id=derive_event_id(event.event_id, "other input"))
    assert intake(other, None, NOW).event_id != intake(event, None, NOW).event_id


# ------------------------------------------------------------------------------------------ grouping


def test_group_key_is_tenant_and_fingerprint() -> None:
    event = factories.fingerprinted(tenant_id="globex", fingerprint="a" * 32)
    assert group_key(event) == "globex:" + "a" * 32


def test_group_first_occurrence_opens_a_window() -> None:
    accepted, state = group(factories.fingerprinted(), None, WINDOW, NOW)
    assert state == FingerprintGroup(first_seen_at=NOW, window_start=NOW, count_in_window=1)
    assert accepted.payload.is_repeat is False
    assert accepted.payload.occurrences_in_window == 1
    assert accepted.payload.first_seen_at == NOW


def test_group_counts_repeats_within_the_window() -> None:
    state = None
    outputs: list[ExceptionAccepted] = []
    for minute in range(5):
        out, state = group(
            factories.fingerprinted(), state, WINDOW, NOW + timedelta(minutes=minute)
        )
        outputs.append(out)
    assert [o.payload.occurrences_in_window for o in outputs] == [1, 2, 3, 4, 5]
    assert [o.payload.is_repeat for o in outputs] == [False, True, True, True, True]
    assert state == FingerprintGroup(first_seen_at=NOW, window_start=NOW, count_in_window=5)


def test_group_just_before_the_window_end_is_a_repeat() -> None:
    state = FingerprintGroup(first_seen_at=NOW, window_start=NOW, count_in_window=1)
    later = NOW + timedelta(seconds=WINDOW) - timedelta(microseconds=1)
    out, new_state = group(factories.fingerprinted(), state, WINDOW, later)
    assert out.payload.is_repeat is True
    assert new_state.count_in_window == 2
    assert new_state.window_start == NOW


def test_group_exactly_at_the_window_end_opens_a_new_window() -> None:
    earlier = NOW - timedelta(days=3)
    state = FingerprintGroup(first_seen_at=earlier, window_start=NOW, count_in_window=7)
    at_end = NOW + timedelta(seconds=WINDOW)
    out, new_state = group(factories.fingerprinted(), state, WINDOW, at_end)
    assert new_state == FingerprintGroup(
        first_seen_at=earlier, window_start=at_end, count_in_window=1
    )
    assert out.payload.is_repeat is False
    assert out.payload.occurrences_in_window == 1
    assert out.payload.first_seen_at == earlier


def test_group_an_occurrence_dated_before_the_window_counts_in_it() -> None:
    state = FingerprintGroup(first_seen_at=NOW, window_start=NOW, count_in_window=2)
    out, new_state = group(factories.fingerprinted(), state, WINDOW, NOW - timedelta(minutes=1))
    assert out.payload.is_repeat is True
    assert new_state.count_in_window == 3


def test_group_carries_the_fingerprinted_payload() -> None:
    event = factories.fingerprinted(normalized_message="card declined", fingerprint="b" * 32)
    out, _ = group(event, None, WINDOW, NOW)
    assert out.payload.report == event.payload.report
    assert out.payload.normalized_message == "card declined"
    assert out.payload.fingerprint == "b" * 32


def test_group_propagates_the_envelope_with_its_own_stage_id() -> None:
    event = factories.fingerprinted()
    out, _ = group(event, None, WINDOW, NOW)
    assert out.event_id == derive_event_id(event.event_id, "group")
    assert out.event_id != derive_event_id(event.event_id, "intake")
    assert out.sequence == event.sequence + 1
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert (out.tenant_id, out.exception_id) == (event.tenant_id, event.exception_id)
    again, _ = group(event, None, WINDOW, NOW + timedelta(minutes=1))
    assert again.event_id == out.event_id


def test_fingerprint_group_survives_a_json_round_trip() -> None:
    """The grouping agent stores the state as JSON in its table."""
    state = FingerprintGroup(first_seen_at=NOW, window_start=NOW, count_in_window=3)
    assert FingerprintGroup.model_validate_json(state.model_dump_json()) == state
