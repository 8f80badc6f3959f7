"""The ``cursor`` of the API's lists (exceptions, approvals, audit), checked before a worker is asked.

A cursor is opaque to clients: the ``next_cursor`` of an earlier page. The workers make and read
them (``app.worker.paging``); the API checks one with the same codec, so that a cursor it never
handed out is a 422 naming ``cursor`` instead of a question no worker can answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from api.errors import ApiProblem
from app.worker.paging import decode_cursor
from schemas.api import FieldError

MAX_CURSOR_LENGTH = 512


def checked_cursor(
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_LENGTH,
            description="The next_cursor of the previous page; omit it for the first page.",
        ),
    ] = None,
) -> str | None:
    if cursor is None:
        return None
    try:
        decode_cursor(cursor)
    except ValueError:
        raise invalid_query(
            "cursor",
            "Is not a cursor this API handed out; pass back the next_cursor of an earlier page, "
            "or omit cursor for the first page",
        ) from None
    return cursor


def invalid_query(field: str, msg: str) -> ApiProblem:
    """A 422 naming one query parameter and why it is invalid."""
    return ApiProblem(
        422,
        f"The request is invalid: query parameter {field}: {msg}. Fix it and send it again.",
        errors=[FieldError(loc=["query", field], field=field, msg=msg, type="value_error")],
    )


CursorQuery = Annotated[str | None, Depends(checked_cursor)]
