"""Free-form JSON (a report's ``attributes``) holds only what the codec writes exactly.

Python's JSON parser reads integers of any size, NaN, Infinity and lone surrogates; orjson refuses or
changes them. The API refuses them with a 422 naming the path, on the single and the batch route,
and keeps everything else exactly (the 64-bit edges included).
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from schemas.codec import JSON_INT_MAX, JSON_INT_MIN, MAX_FREE_FORM_DEPTH, decode
from tests.unit.api.conftest import FakeProducer, auth, report

URL = "/v1/exceptions"
BIG = 2**70
JSON = auth(**{"Content-Type": "application/json"})


def raw_report(attributes: str) -> bytes:
    """A report whose attributes are this raw JSON text (json= cannot send NaN or surrogates)."""
    return (
        b'{"source": "s", "error_type": "E", "message": "m", "attributes": '
        + attributes.encode()
        + b"}"
    )


def errors_of(resp: httpx.Response) -> dict[str, str]:
    assert resp.headers["content-type"] == "application/problem+json"
    return {e["field"]: e["type"] for e in resp.json()["errors"]}


@pytest.mark.parametrize(
    ("attributes", "field"),
    [
        ({"amount": BIG}, "attributes.amount"),
        ({"amount": -BIG}, "attributes.amount"),
        ({"amount": JSON_INT_MAX + 1}, "attributes.amount"),
        ({"amount": JSON_INT_MIN - 1}, "attributes.amount"),
        ({"lines": [1, {"qty": BIG}]}, "attributes.lines.1.qty"),
        ({"a": {"b": {"c": [BIG]}}}, "attributes.a.b.c.0"),
    ],
)
async def test_an_integer_beyond_64_bits_is_422_naming_its_path(
    client: httpx.AsyncClient, producer: FakeProducer, attributes: dict[str, object], field: str
) -> None:
    resp = await client.post(URL, json=report(attributes=attributes), headers=auth())
    assert resp.status_code == 422, resp.text
    assert errors_of(resp) == {field: "int_out_of_range"}
    assert field in resp.json()["detail"]
    assert "as a string" in resp.json()["detail"]
    assert producer.sent == []


async def test_the_fuzzers_integer_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, headers=JSON, content=raw_report('{"n": 6016815517623530815488}'))
    assert resp.status_code == 422
    assert errors_of(resp) == {"attributes.n": "int_out_of_range"}


async def test_integers_at_the_64_bit_edges_are_kept_exactly(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    attributes = {"max": JSON_INT_MAX, "min": JSON_INT_MIN, "nested": [{"n": 2**63}]}
    resp = await client.post(URL, json=report(attributes=attributes), headers=auth())
    assert resp.status_code == 202, resp.text
    [record] = producer.sent
    assert orjson.loads(record.value)["payload"]["report"]["attributes"] == attributes
    assert decode(record.value).payload.report.attributes == attributes  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("attributes", "field", "kind"),
    [
        ('{"x": NaN}', "attributes.x", "finite_number"),
        ('{"x": [Infinity]}', "attributes.x.0", "finite_number"),
        ('{"x": 1e400}', "attributes.x", "finite_number"),
        ('{"x": "\\ud800"}', "attributes.x", "string_unicode"),
        ('{"\\ud800": 1}', "attributes.\\ud800", "string_unicode"),
    ],
)
async def test_values_the_codec_would_change_are_422(
    client: httpx.AsyncClient, attributes: str, field: str, kind: str
) -> None:
    resp = await client.post(URL, headers=JSON, content=raw_report(attributes))
    assert resp.status_code == 422, resp.text
    assert errors_of(resp) == {field: kind}


async def test_nesting_is_bounded(client: httpx.AsyncClient, producer: FakeProducer) -> None:
    deepest = "[" * (MAX_FREE_FORM_DEPTH - 1) + "]" * (MAX_FREE_FORM_DEPTH - 1)
    ok = await client.post(URL, headers=JSON, content=raw_report(f'{{"a": {deepest}}}'))
    assert ok.status_code == 202, ok.text
    # 300 levels made orjson refuse the event (a 500 before).
    deep = "[" * 300 + "]" * 300
    resp = await client.post(URL, headers=JSON, content=raw_report(f'{{"a": {deep}}}'))
    assert resp.status_code == 422
    [(field, kind)] = errors_of(resp).items()
    assert kind == "too_deep"
    assert field == "attributes.a" + ".0" * (MAX_FREE_FORM_DEPTH - 1)


async def test_a_batch_item_with_a_big_integer_is_refused_alone(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    items = [report(attributes={"amount": BIG}), report()]
    resp = await client.post(f"{URL}:batch", json={"items": items}, headers=auth())
    assert resp.status_code == 200, resp.text
    first, second = resp.json()["results"]
    assert first["status_code"] == 422
    assert [e["field"] for e in first["errors"]] == ["attributes.amount"]
    assert second["status_code"] == 202
    assert len(producer.sent) == 1
