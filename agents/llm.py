"""The optional LLM classifier: asks an OpenAI-compatible chat completions endpoint for a severity
and a category, and gets out of the way whenever it cannot answer.

Triage calls :meth:`LLMClassifier.classify` when a tenant enables ``[triage.llm]`` and falls back to
its rules on ``None``. The classifier never raises: a model that is down, slow, over quota or
answering nonsense must not stop exceptions from flowing. After a 429 it stays silent until the
server's Retry-After has passed (and briefly after 5xx, timeouts, connection errors and answers
that say the key or url is wrong), so a struggling endpoint is not hammered by every event in the
stream. :attr:`LLMClassifier.stats`
counts attempts and fallbacks by reason for the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from agents.tools import parse_retry_after
from schemas.config import LLMConfig
from schemas.events import Classification, ExceptionAccepted, Severity

log = logging.getLogger(__name__)

RATE_LIMIT_COOLDOWN_SECONDS = 30.0
ERROR_COOLDOWN_SECONDS = 5.0
# A Retry-After of hours is more likely a misconfigured proxy than a plan; retry after this at most.
MAX_COOLDOWN_SECONDS = 600.0
NOTE_MAX_CHARS = 1000


@dataclass
class LLMStats:
    """Counters for metrics: requests sent, answers used, and fallbacks to the rules by reason."""

    attempts: int = 0
    successes: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)


class _Fallback(Exception):
    """Internal: why this event falls back to the rules, and how long to stay quiet afterwards."""

    def __init__(self, reason: str, detail: str, cooldown: float = 0.0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.cooldown = cooldown


class LLMClassifier:
    """Classifies accepted exceptions with a chat model; ``None`` means "use the rules"."""

    def __init__(
        self,
        config: LLMConfig,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = LLMStats()
        self._client = client
        self._clock = clock
        self._quiet_until = float("-inf")
        self._url = f"{config.base_url.rstrip('/')}/chat/completions"
        self._categories = {c.lower(): c for c in config.categories}

    async def classify(self, event: ExceptionAccepted) -> Classification | None:
        if not self.config.enabled:
            self.stats.fallbacks["disabled"] += 1
            return None
        if self._clock() < self._quiet_until:
            self.stats.fallbacks["cooldown"] += 1
            return None
        self.stats.attempts += 1
        try:
            content = await self._complete(event)
            result = self._parse(content)
        except _Fallback as fallback:
            self.stats.fallbacks[fallback.reason] += 1
            if fallback.cooldown > 0:
                self._quiet_until = self._clock() + fallback.cooldown
            log.debug(
                "LLM classification of %s fell back to rules (%s): %s",
                event.exception_id,
                fallback.reason,
                fallback,
            )
            return None
        except Exception:
            # Whatever went wrong, triage has rules to fall back on; a classifier bug must not
            # dead-letter the event.
            self.stats.fallbacks["unexpected"] += 1
            log.debug("LLM classification of %s failed", event.exception_id, exc_info=True)
            return None
        self.stats.successes += 1
        return result

    def _messages(self, event: ExceptionAccepted) -> list[dict[str, str]]:
        severities = "|".join(s.value for s in Severity)
        if self.config.categories:
            categories = "one of: " + ", ".join(self.config.categories)
        else:
            categories = "a short lowercase label you choose (for example: payments, network)"
        system = (
            "You classify operational exceptions reported by software systems. "
            'Answer with a JSON object only: {"severity": ..., "category": ..., "note": ...}. '
            f"severity is one of {severities}; category is {categories}; "
            "note is one short sentence explaining the choice."
        )
        report = event.payload.report
        user = orjson.dumps(
            {
                "source": report.source,
                "error_type": report.error_type,
                "message": event.payload.normalized_message,
                "attributes": report.attributes,
            },
            default=str,
        ).decode()
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    async def _complete(self, event: ExceptionAccepted) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        body = {
            "model": self.config.model,
            "messages": self._messages(event),
            "response_format": {"type": "json_object"},
            "temperature": 0,
        }
        timeout = self.config.timeout_seconds
        try:
            # httpx's timeout bounds each read; the outer one bounds the whole exchange, so a
            # server that trickles bytes cannot hold triage longer than the configured time.
            async with asyncio.timeout(timeout):
                response = await self._client.post(
                    self._url, content=orjson.dumps(body), headers=headers, timeout=timeout
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _Fallback(
                "timeout", f"no answer in {timeout:g}s", ERROR_COOLDOWN_SECONDS
            ) from exc
        except httpx.HTTPError as exc:
            raise _Fallback(
                "connection", f"{type(exc).__name__}: {exc}", ERROR_COOLDOWN_SECONDS
            ) from exc
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            cooldown = RATE_LIMIT_COOLDOWN_SECONDS if retry_after is None else retry_after
            raise _Fallback("rate_limited", "HTTP 429 (quota)", min(cooldown, MAX_COOLDOWN_SECONDS))
        if status >= 500:
            cooldown = ERROR_COOLDOWN_SECONDS if retry_after is None else retry_after
            raise _Fallback("server_error", f"HTTP {status}", min(cooldown, MAX_COOLDOWN_SECONDS))
        if status in (401, 403, 404):
            # A wrong key or url fails every request alike: pause instead of failing each event.
            raise _Fallback("http_error", f"HTTP {status}", ERROR_COOLDOWN_SECONDS)
        if not 200 <= status <= 299:
            raise _Fallback("http_error", f"HTTP {status}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Fallback("malformed", f"not a chat completion: {exc!r}") from exc

    def _parse(self, content: Any) -> Classification:
        if not isinstance(content, str):
            raise _Fallback("malformed", f"message content is {type(content).__name__}, not text")
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise _Fallback("malformed", f"content is not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise _Fallback("malformed", f"content is JSON {type(answer).__name__}, not an object")
        category = answer.get("category")
        if self._categories:
            if not isinstance(category, str) or category.lower() not in self._categories:
                raise _Fallback("invalid", f"category {category!r} is not one of the configured")
            category = self._categories[category.lower()]
        note = answer.get("note")
        if isinstance(note, str):
            note = note[:NOTE_MAX_CHARS] or None
        elif note is not None:
            note = None
        severity = answer.get("severity")
        if isinstance(severity, str):
            severity = severity.strip().lower()
        try:
            return Classification(severity=severity, category=category, note=note)
        except ValidationError as exc:
            raise _Fallback(
                "invalid", f"not a classification: {exc.error_count()} error(s)"
            ) from exc
