"""The LLM classifier against a real loopback server speaking the chat completions API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from agents.llm import ERROR_COOLDOWN_SECONDS, RATE_LIMIT_COOLDOWN_SECONDS, LLMClassifier
from schemas.config import LLMConfig
from schemas.events import AcceptedPayload, Classification, ExceptionAccepted, ExceptionReport
from tests.support.mock_http import MockHTTPServer, unused_url

KEY_ENV = "SLUICE_TEST_LLM_API_KEY"
COMPLETIONS = "/v1/chat/completions"
CATEGORIES = ("payments", "logistics", "infrastructure")
GOOD_REPLY = {"severity": "high", "category": "payments", "note": "card declined"}


def accepted() -> ExceptionAccepted:
    report = ExceptionReport(
        source="payments",
        error_type="CardDeclined",
        message="Card 4242 declined for order 981",
        attributes={"order": "981", "amount": 12.5},
    )
    return ExceptionAccepted(
        event_id=uuid.uuid4(),
        tenant_id="acme",
        exception_id="exc-1",
        sequence=3,
        occurred_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        causation_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(),
        payload=AcceptedPayload(
            report=report,
            normalized_message="card <n> declined for order <n>",
            fingerprint="fp-1",
            occurrences_in_window=1,
            is_repeat=False,
            first_seen_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        ),
    )


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as mock:
        mock.set_llm_reply(GOOD_REPLY)
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


@pytest.fixture
def clock() -> Clock:
    return Clock()


def llm_config(base_url: str, **overrides: Any) -> LLMConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "base_url": base_url,
        "model": "test-model",
        "timeout_seconds": 0.3,
        "categories": CATEGORIES,
        **overrides,
    }
    return LLMConfig.model_validate(values)


@pytest.fixture
def classifier(server: MockHTTPServer, client: httpx.AsyncClient, clock: Clock) -> LLMClassifier:
    return LLMClassifier(llm_config(f"{server.url}/v1"), client, clock)


# -------------------------------------------------------------------------------------- answers


async def test_good_reply_becomes_a_classification(
    server: MockHTTPServer, classifier: LLMClassifier
) -> None:
    result = await classifier.classify(accepted())

    assert result == Classification(severity="high", category="payments", note="card declined")
    [request] = server.calls(COMPLETIONS)
    body = request.json
    assert body["model"] == "test-model"
    assert body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system"
    assert "critical|high|medium|low|info" in system["content"]
    assert all(category in system["content"] for category in CATEGORIES)
    assert user["role"] == "user"
    assert "card <n> declined for order <n>" in user["content"]
    assert "CardDeclined" in user["content"]
    assert '"order":"981"' in user["content"]
    assert classifier.stats.attempts == 1
    assert classifier.stats.successes == 1
    assert sum(classifier.stats.fallbacks.values()) == 0


async def test_category_is_matched_case_insensitively_to_the_configured_spelling(
    server: MockHTTPServer, classifier: LLMClassifier
) -> None:
    server.set_llm_reply({"severity": "Low", "category": "PAYMENTS"})
    result = await classifier.classify(accepted())
    assert result == Classification(severity="low", category="payments")


async def test_any_category_is_accepted_when_none_are_configured(
    server: MockHTTPServer, client: httpx.AsyncClient, clock: Clock
) -> None:
    classifier = LLMClassifier(llm_config(f"{server.url}/v1", categories=()), client, clock)
    server.set_llm_reply({"severity": "info", "category": "fraud", "note": None})
    assert await classifier.classify(accepted()) == Classification(
        severity="info", category="fraud"
    )
    [request] = server.calls(COMPLETIONS)
    assert "you choose" in request.json["messages"][0]["content"]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("this is not json", "malformed"),
        ('["high", "payments"]', "malformed"),
        ({"severity": "catastrophic", "category": "payments"}, "invalid"),
        ({"severity": "high", "category": "weather"}, "invalid"),
        ({"severity": "high"}, "invalid"),
    ],
)
async def test_unusable_replies_fall_back(
    server: MockHTTPServer, classifier: LLMClassifier, reply: dict[str, Any] | str, reason: str
) -> None:
    server.set_llm_reply(reply)
    assert await classifier.classify(accepted()) is None
    assert classifier.stats.fallbacks == {reason: 1}
    assert len(server.calls(COMPLETIONS)) == 1


async def test_a_body_that_is_not_a_chat_completion_falls_back(
    server: MockHTTPServer, classifier: LLMClassifier
) -> None:
    server.respond(COMPLETIONS, 200, {"result": "high"})
    assert await classifier.classify(accepted()) is None
    server.respond(COMPLETIONS, 200, "<html>gateway</html>")
    assert await classifier.classify(accepted()) is None
    assert classifier.stats.fallbacks == {"malformed": 2}


# ------------------------------------------------------------------------------------ failures


async def test_429_honours_retry_after_before_calling_again(
    server: MockHTTPServer, classifier: LLMClassifier, clock: Clock
) -> None:
    server.fail(COMPLETIONS, 429, retry_after=120)
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1

    clock.now += 119
    assert await classifier.classify(accepted()) is None
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1, "no request while the quota cool-down runs"

    clock.now += 2
    assert await classifier.classify(accepted()) is not None
    assert len(server.calls(COMPLETIONS)) == 2
    assert classifier.stats.fallbacks == {"rate_limited": 1, "cooldown": 2}
    assert classifier.stats.attempts == 2


async def test_429_without_retry_after_waits_the_default(
    server: MockHTTPServer, classifier: LLMClassifier, clock: Clock
) -> None:
    server.fail(COMPLETIONS, 429)
    assert await classifier.classify(accepted()) is None
    clock.now += RATE_LIMIT_COOLDOWN_SECONDS - 1
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1
    clock.now += 2
    assert await classifier.classify(accepted()) is not None


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_fall_back_with_a_short_cooldown(
    server: MockHTTPServer, classifier: LLMClassifier, clock: Clock, status: int
) -> None:
    server.fail(COMPLETIONS, status)
    assert await classifier.classify(accepted()) is None
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1
    clock.now += ERROR_COOLDOWN_SECONDS + 0.1
    assert await classifier.classify(accepted()) is not None
    assert classifier.stats.fallbacks == {"server_error": 1, "cooldown": 1}


async def test_a_refused_request_falls_back_without_cooldown(
    server: MockHTTPServer, classifier: LLMClassifier
) -> None:
    server.fail(COMPLETIONS, 400)
    assert await classifier.classify(accepted()) is None
    assert await classifier.classify(accepted()) is not None
    assert classifier.stats.fallbacks == {"http_error": 1}


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_wrong_key_or_url_pauses_the_classifier(
    server: MockHTTPServer, classifier: LLMClassifier, clock: Clock, status: int
) -> None:
    server.fail(COMPLETIONS, status)
    assert await classifier.classify(accepted()) is None
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1
    clock.now += ERROR_COOLDOWN_SECONDS + 0.1
    assert await classifier.classify(accepted()) is not None
    assert classifier.stats.fallbacks == {"http_error": 1, "cooldown": 1}


async def test_timeout_falls_back_with_a_cooldown(
    server: MockHTTPServer, classifier: LLMClassifier, clock: Clock
) -> None:
    server.delay(COMPLETIONS, 2.0)
    assert await classifier.classify(accepted()) is None
    assert classifier.stats.fallbacks == {"timeout": 1}
    assert await classifier.classify(accepted()) is None
    assert len(server.calls(COMPLETIONS)) == 1
    clock.now += ERROR_COOLDOWN_SECONDS + 0.1
    assert await classifier.classify(accepted()) is not None


async def test_connection_refused_falls_back(client: httpx.AsyncClient, clock: Clock) -> None:
    classifier = LLMClassifier(llm_config(f"{unused_url()}/v1"), client, clock)
    assert await classifier.classify(accepted()) is None
    assert classifier.stats.fallbacks == {"connection": 1}


async def test_disabled_classifier_sends_nothing(
    server: MockHTTPServer, client: httpx.AsyncClient, clock: Clock
) -> None:
    config = llm_config(f"{server.url}/v1", enabled=False)
    classifier = LLMClassifier(config, client, clock)
    assert await classifier.classify(accepted()) is None
    assert server.calls() == []
    assert classifier.stats.attempts == 0
    assert classifier.stats.fallbacks == {"disabled": 1}


# -------------------------------------------------------------------------------- credentials


async def test_authorization_comes_from_the_named_env_var(
    server: MockHTTPServer,
    client: httpx.AsyncClient,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    classifier = LLMClassifier(llm_config(f"{server.url}/v1", api_key_env=KEY_ENV), client, clock)
    await classifier.classify(accepted())
    [request] = server.calls(COMPLETIONS)
    assert request.headers["authorization"] == "Bearer sk-test-123"


async def test_no_authorization_without_a_key(
    server: MockHTTPServer,
    client: httpx.AsyncClient,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    classifier = LLMClassifier(llm_config(f"{server.url}/v1", api_key_env=KEY_ENV), client, clock)
    assert await classifier.classify(accepted()) is not None
    [request] = server.calls(COMPLETIONS)
    assert "authorization" not in request.headers
