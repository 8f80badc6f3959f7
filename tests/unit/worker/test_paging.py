"""The list cursor codec and the worker's check of a list query: a cursor the API did not hand out
is refused, naming the parameter."""

from __future__ import annotations

import base64

import pytest

from app.worker.paging import decode_cursor, encode_cursor
from app.worker.web import invalid_list_query


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


NOT_OURS = ["0", "abc", "%%%", "e30", "ÿ", b64(b"[1, 2]"), b64(b'"ab"'), b64(b'["a", "b", "c"]')]


def test_a_cursor_round_trips() -> None:
    key = ("2026-01-15T09:30:00+00:00", "exc-1")
    assert decode_cursor(encode_cursor(key)) == key


@pytest.mark.parametrize("cursor", NOT_OURS)
def test_a_cursor_not_handed_out_is_a_value_error(cursor: str) -> None:
    with pytest.raises(ValueError, match="is not one this API handed out"):
        decode_cursor(cursor)


@pytest.mark.parametrize("cursor", NOT_OURS)
def test_the_worker_names_the_cursor(cursor: str) -> None:
    field, detail = invalid_list_query({"cursor": cursor}) or ("", "")
    assert field == "cursor"
    assert "next_cursor" in detail


@pytest.mark.parametrize(
    ("query", "field"),
    [({"limit": "x"}, "limit"), ({"since": "yesterday"}, "since"), ({"until": "?"}, "until")],
)
def test_the_worker_names_other_parameters(query: dict[str, str], field: str) -> None:
    assert (invalid_list_query(query) or ("", ""))[0] == field


def test_a_valid_query_passes() -> None:
    query = {"limit": "5", "cursor": encode_cursor(("a", "b")), "since": "2026-01-15T09:30:00Z"}
    assert invalid_list_query(query) is None
