"""Paged lists that a worker gathers from the whole group: opaque cursors and merged pages.

Every list the worker serves (exceptions, pending approvals, the audit trail) is a page of items
sorted by a key of two strings, gathered from every worker's own partitions. Each worker answers
``limit + 1`` items after the cursor, the gathering one sorts them all, keeps ``limit`` and, when
more remain, hands out the last kept item's key as the next cursor.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson

Key = tuple[str, str]
Item = dict[str, Any]


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode()


def decode_cursor(cursor: str) -> Key:
    """The key a cursor holds; ValueError when it is not one this worker handed out."""
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (TypeError, ValueError) as exc:  # not ASCII, not base64, not JSON
        raise ValueError(_NOT_OURS.format(cursor[:40])) from exc
    # A cursor holds a pair of strings; anything else (``e30`` is base64 of {}) was not handed out.
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise ValueError(_NOT_OURS.format(cursor[:40]))
    return (key[0], key[1])


_NOT_OURS = "cursor {!r} is not one this API handed out"


def page(items: list[Item], key: Callable[[Item], Key], limit: int, newest_first: bool) -> Item:
    """``{"items": ..., "next_cursor": ...}``: the first ``limit`` of ``items`` in order."""
    items.sort(key=key, reverse=newest_first)
    more = len(items) > limit
    kept = items[:limit]
    return {"items": kept, "next_cursor": encode_cursor(key(kept[-1])) if more and kept else None}
