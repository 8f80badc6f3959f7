"""The local broker's helpers that need no broker."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

from app.kafka_local import new_cluster_id

# 0xF8 puts 0b111110 (62, '-' in URL-safe base64) in the first six bits.
DASH_FIRST = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))
PLAIN = uuid.UUID(bytes=bytes([0x10]) + bytes(15))


def test_an_id_that_would_start_with_a_dash_is_drawn_again() -> None:
    assert base64.urlsafe_b64encode(DASH_FIRST.bytes).decode().startswith("-")
    draws: Iterator[uuid.UUID] = iter([DASH_FIRST, DASH_FIRST, PLAIN])

    cluster_id = new_cluster_id(lambda: next(draws))

    assert cluster_id == base64.urlsafe_b64encode(PLAIN.bytes).decode().rstrip("=")
    assert next(draws, None) is None  # all three were drawn


def test_ids_are_22_url_safe_characters_and_never_start_with_a_dash() -> None:
    ids = {new_cluster_id() for _ in range(5000)}

    assert len(ids) == 5000
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert uuid.UUID(bytes=base64.urlsafe_b64decode(cluster_id + "==")).version == 4
