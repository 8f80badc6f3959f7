"""Intake: the first stage after the API, turning a raw report into a groupable exception.

Two pure steps, each driven by a thin Faust agent:

1. :func:`intake` (agent keyed by exception id) normalizes the message and fingerprints the report,
   and emits an ``ExceptionFingerprinted`` to an internal topic keyed by :func:`group_key`.
2. :func:`group` (agent keyed by ``tenant:fingerprint``, so one fingerprint's events are counted by
   one worker, in order) counts repeats in a window kept in a :class:`FingerprintGroup` table
   entry, and emits the ``ExceptionAccepted`` that triage consumes.

The fingerprint is what makes "the same problem again" recognisable: volatile tokens (ids, numbers,
timestamps...) are replaced by placeholders first, so two reports that differ only in an order
number land in one group.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from datetime import datetime, timedelta

from pydantic import AwareDatetime, BaseModel, Field

from schemas.events import (
    AcceptedPayload,
    ExceptionAccepted,
    ExceptionFingerprinted,
    ExceptionIngested,
    FingerprintedPayload,
    follow,
)

# ------------------------------------------------------------------------------------ normalization
#
# The patterns run on lowercased, whitespace-collapsed text, in the order of _TOKENS; quoted
# strings go last (_replace_quoted). They are ASCII-only (``re.ASCII``) so that what counts as a
# digit or a word character never depends on the Unicode tables of the Python build. Most patterns
# match whole tokens only: not glued to an ASCII letter or digit, so ``order_123`` and ``order-123``
# give ``order_<n>`` and ``order-<n>``, while ``http2`` or ``e1001`` (codes, not counters) stay.

_FLAGS = re.ASCII

# user.name+tag@sub.example.com. The lookbehind makes a match start at the beginning of the local
# part, which also keeps a long run without '@' from being rescanned from every position.
_EMAIL = re.compile(
    r"(?<![0-9a-z._%+-])[0-9a-z._%+-]+@[0-9a-z-]+(?:\.[0-9a-z-]+)*\.[a-z]{2,}(?![0-9a-z])", _FLAGS
)
# 8-4-4-4-12 hex digits; before <hex>, which would otherwise take its first group.
_UUID = re.compile(
    r"(?<![0-9a-z])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![0-9a-z])",
    _FLAGS,
)
# ISO 8601 date, optionally with a time ('t' or a space: the text is lowercased), fractional
# seconds and a zone ('z' or an offset); before <n>, which would otherwise cut it into numbers.
_TIMESTAMP = re.compile(
    r"(?<![0-9a-z])\d{4}-\d{2}-\d{2}"
    r"(?:[t ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:z|[+-]\d{2}(?::?\d{2})?)?)?"
    r"(?![0-9a-z])",
    _FLAGS,
)
# IPv6 in full (eight groups) or compressed ('::') form, optionally ending in an IPv4 address
# (::ffff:10.0.0.1). The whole run of hex digits and colons must be the address, so 'std::vector' or
# a time like 12:00:00 is left alone.
_IPV6 = re.compile(
    r"(?<![0-9a-z:])"
    r"(?=[0-9a-f:]*::|(?:[0-9a-f]{1,4}:){6})"
    r"(?=[0-9a-f:]*[0-9a-f])"
    r"(?:[0-9a-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{0,4})"
    r"(?![0-9a-z:]|\.\d)",
    _FLAGS,
)
# Dotted-quad IPv4 (a port after it becomes :<n>); not the middle of a longer dotted number.
_IPV4 = re.compile(r"(?<![0-9a-z])(?<![0-9a-z]\.)(?:\d{1,3}\.){3}\d{1,3}(?![0-9a-z]|\.\d)", _FLAGS)
# 0x-prefixed hex of any length, or a bare token of at least 8 hex digits with at least one letter
# (all-digit tokens are numbers, below). Whole tokens only: 'abc12345xyz' is not a hex id.
_HEX = re.compile(r"(?<![0-9a-z])(?:0x[0-9a-f]+|(?=\d*[a-f])[0-9a-f]{8,})(?![0-9a-z])", _FLAGS)
# Integers and decimals, with '.' or ',' separators (1,234.50); a unit glued after it stays (30s ->
# <n>s, so durations group). Digits glued after a letter are part of a code and stay (http2).
_NUMBER = re.compile(r"(?<![0-9a-z])(?<![0-9a-z]\.)\d+(?:[.,]\d+)*", _FLAGS)

_TOKENS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_EMAIL, "<email>"),
    (_UUID, "<uuid>"),
    (_TIMESTAMP, "<ts>"),
    (_IPV6, "<ip>"),
    (_IPV4, "<ip>"),
    (_HEX, "<hex>"),
    (_NUMBER, "<n>"),
)

_QUOTE = re.compile("['\"]")


def _is_word_char(text: str, index: int) -> bool:
    """Whether ``text[index]`` exists and is an ASCII letter, digit or underscore."""
    if not 0 <= index < len(text):
        return False
    char = text[index]
    return char.isascii() and (char.isalnum() or char == "_")


def _replace_quoted(text: str) -> str:
    """``'...'`` and ``"..."`` replaced by ``<str>``, scanning left to right.

    A quote opens when it does not follow a word character and closes at the next quote of the same
    kind that is not followed by one; so an apostrophe inside a word (can't, order's) neither opens
    nor closes, and ``'can't connect'`` is one quoted string. What a quoted string holds (the other
    kind of quote included) does not matter. A scanner rather than a regular expression because the
    expression rescans to the end of the text from every quote that never closes, which is quadratic
    in the worst case; this is linear (a binary search per quote).
    """
    quotes = [m.start() for m in _QUOTE.finditer(text)]
    if not quotes:
        return text
    closers = {
        kind: [i for i in quotes if text[i] == kind and not _is_word_char(text, i + 1)]
        for kind in "'\""
    }
    parts: list[str] = []
    position = 0
    for start in quotes:
        if start < position or _is_word_char(text, start - 1):
            continue
        candidates = closers[text[start]]
        after = bisect.bisect_right(candidates, start)
        if after == len(candidates):
            continue
        parts += [text[position:start], "<str>"]
        position = candidates[after] + 1
    parts.append(text[position:])
    return "".join(parts)


def _replace_tokens(text: str) -> str:
    for pattern, placeholder in _TOKENS:
        text = pattern.sub(placeholder, text)
    return _replace_quoted(text)


def normalize_message(message: str) -> str:
    """The message with its volatile parts replaced by placeholders, so repeats of one problem
    compare equal.

    Steps, in order: lowercase; collapse every run of whitespace to one space and strip; then
    replace emails (``<email>``), UUIDs (``<uuid>``), ISO timestamps (``<ts>``), IPv6 and IPv4
    addresses (``<ip>``), hex ids (``<hex>``), numbers (``<n>``) and quoted strings (``<str>``).
    The order matters: a more specific token is replaced before a pattern that would cut it into
    pieces (a timestamp before its numbers, a UUID before its hex groups, an email before its
    digits), and quoted strings go last, so what they held no longer matters.

    The replacements are repeated until the text no longer changes, which makes the function
    idempotent by construction (normalizing a normalized message changes nothing): a replacement
    can expose a token that an earlier pattern skipped (``12345::ab`` holds no address until its
    number is replaced). It terminates because every change removes at least one letter, digit,
    quote or '@' outside a placeholder, and no pattern matches a placeholder. One or two passes are
    the rule.
    """
    text = " ".join(message.lower().split())
    while True:
        replaced = _replace_tokens(text)
        if replaced == text:
            return text
        text = replaced


# -------------------------------------------------------------------------------------- fingerprint


def fingerprint(tenant_id: str, source: str, error_type: str, normalized_message: str) -> str:
    """A stable 32-hex-character id for "this kind of problem, for this tenant".

    The tenant is part of it, so two tenants never share a group. ``source`` and ``error_type`` are
    compared case-insensitively (producers are inconsistent about ``Payments`` vs ``payments``). The
    fields are encoded as a JSON array before hashing, so no choice of field values can make two
    different tuples collide by shifting text from one field to the next; ASCII-escaped JSON also
    encodes any Python string, lone surrogates included.
    """
    fields = [tenant_id, source.lower(), error_type.lower(), normalized_message]
    canonical = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


def intake(
    event: ExceptionIngested, known_fingerprint: str | None, now: datetime
) -> ExceptionFingerprinted:
    """Normalize and fingerprint one ingested report.

    ``known_fingerprint`` is the fingerprint of this exception's first report, which the agent keeps
    per exception id. When given it wins over a fresh computation, so every event of one exception
    carries one fingerprint and stays in one partition of the fingerprint-keyed grouping topic, in
    order, even when a later report words its message differently or a new release normalizes
    differently. The normalized message is still recomputed: it describes this report.
    """
    report = event.payload.report
    normalized = normalize_message(report.message)
    fp = known_fingerprint or fingerprint(
        event.tenant_id, report.source, report.error_type, normalized
    )
    payload = FingerprintedPayload(report=report, normalized_message=normalized, fingerprint=fp)
    return follow(event, ExceptionFingerprinted, "intake", payload, now)


# ----------------------------------------------------------------------------------------- grouping


class FingerprintGroup(BaseModel, frozen=True):
    """What the grouping agent keeps per ``tenant:fingerprint``: the current repeat window."""

    first_seen_at: AwareDatetime = Field(
        description="First occurrence ever seen (kept across windows)."
    )
    window_start: AwareDatetime = Field(description="First occurrence of the current window.")
    count_in_window: int = Field(
        ge=1, description="Occurrences in the current window, this one included."
    )


def group_key(event: ExceptionFingerprinted) -> str:
    """The grouping topic's key and table key: tenant first, so tenants never share a group."""
    return f"{event.tenant_id}:{event.payload.fingerprint}"


def group(
    event: ExceptionFingerprinted,
    state: FingerprintGroup | None,
    window_seconds: int,
    now: datetime,
) -> tuple[ExceptionAccepted, FingerprintGroup]:
    """Count this occurrence in its fingerprint's repeat window; return the event and the new state.

    The window tumbles from its first occurrence: an occurrence at or after ``window_start +
    window_seconds`` opens a new window (count 1, not a repeat) instead of sliding the old one, so a
    steady trickle of one error is reported as a fresh exception once per window rather than being
    suppressed as a repeat forever. ``first_seen_at`` survives across windows. An occurrence dated
    before the window start (a clock step back, a replay) counts in the current window.
    """
    window = timedelta(seconds=window_seconds)
    if state is None or now - state.window_start >= window:
        new_state = FingerprintGroup(
            first_seen_at=state.first_seen_at if state is not None else now,
            window_start=now,
            count_in_window=1,
        )
        is_repeat = False
    else:
        new_state = state.model_copy(update={"count_in_window": state.count_in_window + 1})
        is_repeat = True
    fingerprinted = event.payload
    payload = AcceptedPayload(
        report=fingerprinted.report,
        normalized_message=fingerprinted.normalized_message,
        fingerprint=fingerprinted.fingerprint,
        occurrences_in_window=new_state.count_in_window,
        is_repeat=is_repeat,
        first_seen_at=new_state.first_seen_at,
    )
    return follow(event, ExceptionAccepted, "group", payload, now), new_state
