"""Every error the API answers is an RFC 9457 problem document (``schemas.api.Problem``).

Routes raise :class:`ApiProblem` with a sentence saying what was wrong and what to do; the handlers
registered by :func:`install` turn it, FastAPI's validation errors and Starlette's HTTP errors (unknown
path, wrong method) into ``application/problem+json`` answers. Validation errors keep one entry per
invalid field (``loc``, dotted ``field``, ``msg``) and a ``detail`` that lists them in one readable line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import FieldError, Problem

PROBLEM_JSON = "application/problem+json"
# How long a client should wait before retrying a 503 (Kafka or the workers unreachable).
RETRY_AFTER_SECONDS = 5


class ApiProblem(Exception):
    """An error answer: status, a sentence for ``detail``, optional field errors and headers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})


def unavailable(detail: str) -> ApiProblem:
    """A 503 with Retry-After: the request was fine, a dependency (Kafka, the workers) was not."""
    return ApiProblem(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def problem_response(
    status: int,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_JSON,
    )


def field_errors(errors: Sequence[Any]) -> list[FieldError]:
    """Pydantic/FastAPI error dicts as :class:`FieldError` entries."""
    out = []
    for err in errors:
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        out.append(
            FieldError(
                loc=loc,
                field=_dotted(loc),
                msg=_sentence(str(err.get("msg", "is invalid"))),
                type=str(err.get("type", "value_error")),
            )
        )
    return out


def describe(errors: Sequence[FieldError], *, whole: str = "(the body)") -> str:
    """One line listing each invalid field and why (``whole`` names an error of the whole value)."""
    return "; ".join(f"{_where(e)}{e.field or whole}: {e.msg}" for e in errors)


_PLACES = {"query": "query parameter ", "path": "path parameter ", "header": "header "}


def _where(error: FieldError) -> str:
    return _PLACES.get(str(error.loc[0]), "") if error.loc else ""


def _dotted(loc: Sequence[str | int]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def _sentence(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[:1].upper() + msg[1:]


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ApiProblem):  # registered for it only
        raise exc
    return problem_response(exc.status, exc.detail, errors=exc.errors, headers=exc.headers)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # registered for it only
        raise exc
    errors = field_errors(exc.errors())
    detail = f"The request is invalid: {describe(errors)}. Fix these fields and send it again."
    return problem_response(422, detail, errors=errors)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # registered for it only
        raise exc
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"There is no resource at {request.url.path}; see /docs for the API's paths."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs."
    return problem_response(exc.status_code, detail, headers=exc.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiProblem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
