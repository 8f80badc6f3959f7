"""Request and response models of the HTTP API, in families (Create / Created / Public / ListPublic).

The API is a thin edge in front of Kafka and the workers' tables, so most models are the pipeline's own:
a report is accepted as :class:`ExceptionCreate` (the fields of ``schemas.events.ExceptionReport``, no
tenant: the tenant comes from the API key), an exception is served as its folded state
(:data:`ExceptionPublic`) and its history as :data:`EventPublic` entries. Errors are RFC 9457 problem
documents (:class:`Problem`) whose ``errors`` name each invalid field.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError, field_validator
from pydantic.json_schema import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.codec import JSON_INT_MAX, JSON_INT_MIN, MAX_FREE_FORM_DEPTH, unencodable
from schemas.events import ExceptionReport
from schemas.state import ExceptionState, HistoryEntry

# An exception as served by GET /v1/exceptions/{id}: its state, as the projection folds it.
ExceptionPublic = ExceptionState
# One event of an exception's history, as served by GET /v1/exceptions/{id}/events.
EventPublic = HistoryEntry


_EXAMPLE_REPORT: JsonDict = {
    "source": "payments-gateway",
    "error_type": "CardDeclined",
    "message": "Card declined for order 1042: insufficient funds",
    "occurred_at": "2026-01-15T09:30:00Z",
    "external_ref": "evt_8f2a",
    "attributes": {"order_id": "1042", "amount": 129.9, "region": "eu-west-1"},
}


class ExceptionCreate(ExceptionReport):
    """Body of POST /v1/exceptions: one exception report.

    The tenant is never part of the body (an unknown field such as ``tenant_id`` is rejected); it is
    the tenant of the ``X-API-Key`` the request carries. ``occurred_at`` must carry a time zone and is
    stored in UTC.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"examples": [_EXAMPLE_REPORT]}
    )

    attributes: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Free-form context (amount, order id, region...), stored exactly as sent. Integers "
            f"must lie between {JSON_INT_MIN} and {JSON_INT_MAX} (64 bits; send larger ones as "
            "strings), numbers must be finite, text valid Unicode, and values may nest at most "
            f"{MAX_FREE_FORM_DEPTH} arrays or objects deep. A value breaking these rules is "
            "refused with 422 naming its path, e.g. `attributes.amount`."
        ),
    )

    @field_validator("attributes")
    @classmethod
    def _encodable(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Refuse what the codec would refuse or change, naming each place (``amount``, ``a.0``):
        pydantic prefixes the field, so a client reads ``attributes.amount``."""
        problems = unencodable(value)
        if problems:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError(p.type, p.msg), loc=p.loc, input=p.value
                    )
                    for p in problems
                ],
            )
        return value

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def to_report(self) -> ExceptionReport:
        """The report as the pipeline's events carry it."""
        return ExceptionReport.model_validate(self.model_dump())


class ExceptionCreated(BaseModel):
    """Body of the 202 answer: the exception is durably on Kafka; follow it at ``status_url``."""

    model_config = ConfigDict(frozen=True)

    exception_id: str = Field(description="The id of the new exception (also in Location).")
    event_id: uuid.UUID = Field(description="The id of its ExceptionIngested event.")
    status_url: str = Field(description="Where to read its state: /v1/exceptions/{exception_id}.")


class ExceptionListPublic(BaseModel):
    """One page of a tenant's exceptions; pass ``next_cursor`` back as ``cursor`` for the next."""

    model_config = ConfigDict(frozen=True)

    items: list[ExceptionPublic]
    next_cursor: str | None = Field(
        default=None, description="Opaque cursor of the next page; null on the last page."
    )


class BatchCreate(BaseModel):
    """Body of POST /v1/exceptions:batch.

    Each item has the schema of :class:`ExceptionCreate`, but items are validated one by one by the
    route (their validation is skipped here), so one invalid item is reported in its own result and
    does not reject the others.
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"items": [_EXAMPLE_REPORT]}]}
    )

    items: list[SkipValidation[ExceptionCreate]] = Field(
        min_length=1, description="The reports, at most SLUICE_MAX_BATCH_ITEMS of them."
    )


class FieldError(BaseModel):
    """One invalid field: where it is and what is wrong with it."""

    model_config = ConfigDict(frozen=True)

    loc: list[str | int] = Field(description="Path to the field, e.g. ['body', 'message'].")
    field: str = Field(description="The path as one dotted string, e.g. 'attributes.amount'.")
    msg: str = Field(description="What is wrong, as a sentence.")
    type: str = Field(description="Machine-readable error kind (pydantic's error type).")


class BatchItemResult(BaseModel):
    """The outcome of one batch item, at the item's position in the request."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Position of the item in the request's items.")
    status_code: int = Field(
        description="What a single POST would have answered: 202, 413, 422, 503."
    )
    exception_id: str | None = None
    event_id: uuid.UUID | None = None
    location: str | None = Field(default=None, description="/v1/exceptions/{exception_id}")
    detail: str | None = Field(default=None, description="Why the item was not accepted.")
    errors: list[FieldError] | None = Field(default=None, description="The item's invalid fields.")


class BatchResult(BaseModel):
    """Body of the 200 answer to a batch: per-item results in input order (a 207-style answer)."""

    model_config = ConfigDict(frozen=True)

    results: list[BatchItemResult]
    accepted: int = Field(description="Items answered 202.")
    rejected: int = Field(description="Items not accepted (see their status_code).")


class Problem(BaseModel):
    """An error answer, per RFC 9457 (application/problem+json)."""

    model_config = ConfigDict(frozen=True)

    type: str = "about:blank"
    title: str = Field(description="The HTTP status phrase, e.g. 'Not Found'.")
    status: int
    detail: str = Field(description="What was wrong and what to do, as sentences.")
    errors: list[FieldError] | None = Field(
        default=None, description="For validation errors: each invalid field and why."
    )


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    kafka: Literal["connected", "disconnected"]
    detail: str | None = None
