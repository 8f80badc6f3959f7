"""Requests the API refuses before producing anything: auth, validation, body size, headers.

These run against the real app with no broker (its producer points at a closed port).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.main import create_api
from schemas.config import ConfigError
from tests.unit.api.conftest import auth, make_settings, report

URL = "/v1/exceptions"


def fields_of(resp: httpx.Response) -> dict[str, str]:
    return {e["field"]: e["msg"] for e in resp.json()["errors"]}


async def test_missing_message_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(message=None), headers=auth())
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["status"] == 422
    assert problem["errors"] == [
        {"loc": ["body", "message"], "field": "message", "msg": "Field required", "type": "missing"}
    ]
    assert "message: Field required" in problem["detail"]


async def test_empty_source_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(source=""), headers=auth())
    assert resp.status_code == 422
    assert fields_of(resp) == {"source": "String should have at least 1 character"}


async def test_tenant_id_in_the_body_is_refused(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(tenant_id="globex"), headers=auth())
    assert resp.status_code == 422
    assert fields_of(resp) == {"tenant_id": "Extra inputs are not permitted"}


async def test_occurred_at_without_timezone_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(occurred_at="2026-01-15T09:30:00"), headers=auth())
    assert resp.status_code == 422
    assert fields_of(resp) == {"occurred_at": "Input should have timezone info"}


async def test_several_errors_are_all_named(client: httpx.AsyncClient) -> None:
    body = report(source="", message=None, extra="x")
    resp = await client.post(URL, json=body, headers=auth())
    assert resp.status_code == 422
    assert set(fields_of(resp)) == {"source", "message", "extra"}
    detail = resp.json()["detail"]
    assert detail.startswith("The request is invalid: ")
    assert all(name in detail for name in ("source:", "message:", "extra:"))


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        URL, content=b'{"source": ', headers=auth(**{"Content-Type": "application/json"})
    )
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["type"] == "json_invalid"


async def test_missing_api_key_is_401(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report())
    assert resp.status_code == 401
    assert "X-API-Key header is missing" in resp.json()["detail"]
    assert "WWW-Authenticate" in resp.headers


async def test_wrong_api_key_is_401(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(), headers={"X-API-Key": "not-a-key"})
    assert resp.status_code == 401
    assert "not valid" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/exceptions"),
        ("GET", "/v1/exceptions/some-id"),
        ("GET", "/v1/exceptions/some-id/events"),
        ("POST", "/v1/exceptions:batch"),
    ],
)
async def test_every_v1_route_needs_a_key(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    resp = await client.request(method, path, json={"items": [report()]})
    assert resp.status_code == 401


async def test_auth_is_checked_before_the_body(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json={"tenant_id": "globex"}, headers={"X-API-Key": "nope"})
    assert resp.status_code == 401


# ------------------------------------------------------------------------------------------ 413


async def test_oversized_body_with_content_length_is_413(client: httpx.AsyncClient) -> None:
    body = report(message="x" * 5000)  # the test app's limit is 4096 bytes
    resp = await client.post(URL, json=body, headers=auth())
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "application/problem+json"
    assert "limit is 4096 bytes" in resp.json()["detail"]


async def test_oversized_chunked_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"source": "s", "error_type": "e", "message": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    resp = await client.post(
        URL, content=chunks(), headers=auth(**{"Content-Type": "application/json"})
    )
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert resp.status_code == 413
    assert "limit is 4096 bytes" in resp.json()["detail"]


async def test_413_comes_before_auth(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, content=b"x" * 5000)
    assert resp.status_code == 413


async def test_chunked_body_under_the_limit_is_read(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"source": "", '
        yield b'"error_type": "e", "message": "m"}'

    resp = await client.post(
        URL, content=chunks(), headers=auth(**{"Content-Type": "application/json"})
    )
    assert resp.status_code == 422  # read whole, then validated: the empty source is named
    assert fields_of(resp) == {"source": "String should have at least 1 character"}


# ------------------------------------------------------------------------------ Idempotency-Key


@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "tab\there", "caf\u00e9", '""'],
    ids=["empty", "too-long", "control-char", "non-ascii", "empty-quoted"],
)
async def test_malformed_idempotency_key_is_400_naming_the_header(
    client: httpx.AsyncClient, key: str
) -> None:
    headers = auth()
    resp = await client.post(
        URL,
        json=report(),
        headers=httpx.Headers({**headers, "Idempotency-Key": key.encode("latin-1")}),
    )
    assert resp.status_code == 400
    assert (
        "Idempotency-Key header must be 1 to 255 printable ASCII characters"
        in (resp.json()["detail"])
    )


# -------------------------------------------------------------------------------------- batch


async def test_batch_reports_each_invalid_item_with_its_fields(client: httpx.AsyncClient) -> None:
    items = [report(message=None), "not an object", report(source="", tenant_id="x")]
    resp = await client.post(f"{URL}:batch", json={"items": items}, headers=auth())
    assert resp.status_code == 200
    result = resp.json()
    assert result["accepted"] == 0
    assert result["rejected"] == 3
    by_index = {r["index"]: r for r in result["results"]}
    assert [r["index"] for r in result["results"]] == [0, 1, 2]
    assert all(r["status_code"] == 422 for r in by_index.values())
    assert [e["field"] for e in by_index[0]["errors"]] == ["message"]
    assert by_index[1]["errors"][0]["field"] == ""
    assert "(the item)" in by_index[1]["detail"]
    assert {e["field"] for e in by_index[2]["errors"]} == {"source", "tenant_id"}


async def test_batch_with_too_many_items_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(f"{URL}:batch", json={"items": [report()] * 6}, headers=auth())
    assert resp.status_code == 422
    assert "at most 5 items" in resp.json()["detail"]
    assert resp.json()["errors"][0]["field"] == "items"


@pytest.mark.parametrize("body", [{"items": []}, {"items": "x"}, {}, {"items": [], "more": 1}])
async def test_malformed_batch_is_422(client: httpx.AsyncClient, body: object) -> None:
    resp = await client.post(f"{URL}:batch", json=body, headers=auth())
    assert resp.status_code == 422


# ------------------------------------------------------------------------------------- reads


async def test_list_limit_out_of_range_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.get(URL, params={"limit": 201}, headers=auth())
    assert resp.status_code == 422
    assert "query parameter limit" in resp.json()["detail"]


async def test_list_unknown_status_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.get(URL, params={"status": "exploded"}, headers=auth())
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["loc"] == ["query", "status"]


async def test_unknown_path_is_a_problem(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/nothing")
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/problem+json"


# ----------------------------------------------------------------------------------- startup


async def test_a_bad_api_keys_file_stops_startup_with_its_text(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "api_keys.toml").write_text(
        '[[keys]]\ntenant_id = "acme"\nname = "ci"\nrole = "producer"\nsha256 = "nothex"\n'
    )
    api = create_api(make_settings(config))
    with pytest.raises(ConfigError, match=r'api_keys\.toml: keys\[0\] \("ci"\): sha256 must be'):
        async with api.router.lifespan_context(api):
            pass


async def test_a_missing_api_keys_file_stops_startup(tmp_path: Path) -> None:
    api = create_api(make_settings(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"api_keys\.toml does not exist"):
        async with api.router.lifespan_context(api):
            pass


async def test_app_starts_without_a_broker_and_is_not_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["status"] == "not_ready"
    assert resp.headers["Retry-After"] == "5"


async def test_post_without_a_broker_is_503_with_retry_after(client: httpx.AsyncClient) -> None:
    resp = await client.post(URL, json=report(), headers=auth())
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "5"
    assert "not accepted" in resp.json()["detail"]
    assert "Location" not in resp.headers


# ------------------------------------------------------------------------------------ OpenAPI


async def test_openapi_lists_paths_statuses_and_security(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert {
        "/v1/exceptions",
        "/v1/exceptions:batch",
        "/v1/exceptions/{exception_id}",
        "/v1/exceptions/{exception_id}/events",
        "/healthz",
        "/readyz",
    } <= set(paths)
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key of the tenant: it decides the tenant of every request and, by "
        "its role, which routes the request may use.",
    }
    create = paths["/v1/exceptions"]["post"]
    assert create["security"] == [{"ApiKey": []}]
    assert {"202", "400", "401", "409", "413", "422", "503"} <= set(create["responses"])
    assert create["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ExceptionCreated"
    )
    assert "Location" in create["responses"]["202"]["headers"]
    problem = create["responses"]["422"]["content"]["application/problem+json"]["schema"]
    assert problem["$ref"].endswith("/Problem")
    headers = [p for p in create["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in headers] == ["Idempotency-Key"]
    assert "between 1 and 2" in create["description"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ExceptionCreate"
    )
    read = paths["/v1/exceptions/{exception_id}"]["get"]
    assert {"200", "401", "404", "503"} <= set(read["responses"])
    assert read["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ExceptionState"
    )
    listing = paths["/v1/exceptions"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "status",
        "severity",
        "stage",
        "limit",
        "cursor",
    }
    assert "tenant_id" not in doc["components"]["schemas"]["ExceptionCreate"]["properties"]


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    resp = await client.get("/docs")
    assert resp.status_code == 200
    assert "swagger" in resp.text.lower()
