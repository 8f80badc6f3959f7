"""api_keys.toml is read again when it changes: good content replaces the keys in use, bad content
is refused with one error and the keys in use stay."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import httpx
import pytest

from api.key_reload import KeyFileWatcher, load_key_file
from app.telemetry import REGISTRY
from schemas.config import ApiKeys
from tests.unit.api.conftest import (
    ROLE_KEYS,
    FakeReader,
    Key,
    all_keys,
    api_keys_toml,
    as_role,
    write_api_keys,
)


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("sluice_api_keys_reloads_total", {"result": result}) or 0.0


def in_use(role: str) -> float | None:
    return REGISTRY.get_sample_value("sluice_api_keys", {"role": role})


class Watched:
    """A watcher of a tmp api_keys.toml, and the keys it handed over last."""

    def __init__(self, path: Path) -> None:
        self.path = path
        keys, content = load_key_file(path)
        self.applied: list[ApiKeys] = []
        self.watcher = KeyFileWatcher(path, keys, content, self.applied.append)

    def write(self, text: str) -> None:
        self.path.write_text(text)

    def settle(self) -> list[str | None]:
        """Poll as the running watcher would, twice: a change is acted on at the second read."""
        return [self.watcher.poll(), self.watcher.poll()]


@pytest.fixture
def watched(tmp_path: Path) -> Watched:
    return Watched(write_api_keys(tmp_path / "config"))


def without(role: str) -> str:
    return api_keys_toml([k for k in all_keys() if k.role != role or k.tenant != "acme"])


def test_nothing_happens_while_the_file_stays_the_same(watched: Watched) -> None:
    assert watched.settle() == [None, None]
    assert watched.applied == []


def test_a_removed_key_is_refused_after_the_second_read(watched: Watched) -> None:
    before = reloads("ok")
    watched.write(without("viewer"))
    assert watched.settle() == [None, "ok"]
    [keys] = watched.applied
    assert keys.caller_for(ROLE_KEYS["viewer"]) is None
    assert keys.caller_for(ROLE_KEYS["operator"]) is not None
    assert watched.watcher.keys is keys
    assert reloads("ok") == before + 1
    assert in_use("viewer") == 0
    assert in_use("admin") == 2
    assert watched.settle() == [None, None]  # acted on once


def test_a_role_change_is_applied(watched: Watched) -> None:
    keys = [
        Key(k.tenant, k.key, "operator", k.name) if k.role == "viewer" else k for k in all_keys()
    ]
    watched.write(api_keys_toml(keys))
    assert watched.settle() == [None, "ok"]
    caller = watched.applied[-1].caller_for(ROLE_KEYS["viewer"])
    assert caller is not None and caller.role == "operator"


# acme's operator key loses its role
MISSING_ROLE = api_keys_toml(all_keys()).replace(
    '"acme operator"\nrole = "operator"\n', '"acme operator"\n'
)

# acme's admin key is listed by itself rather than by its digest
BAD_DIGEST = re.sub(
    r'sha256 = "[0-9a-f]{64}"', 'sha256 = "acme-secret-key"', api_keys_toml(all_keys()), count=1
)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("[[keys]\nnot toml", "is not valid TOML"),
        (
            MISSING_ROLE,
            'keys[4] ("acme operator"): role is required (one of producer, viewer, operator, admin)',
        ),
        (BAD_DIGEST, 'keys[0] ("acme admin"): sha256 must be the key\'s sha256 digest'),
        ("", "lists no API keys, and using it would refuse every request"),
        ("keys = []\n", "lists no API keys"),
    ],
    ids=["bad-toml", "missing-role", "bad-digest", "empty-file", "no-keys"],
)
def test_bad_content_is_refused_once_and_the_keys_stay(
    watched: Watched, caplog: pytest.LogCaptureFixture, content: str, says: str
) -> None:
    before = reloads("refused")
    keys = watched.watcher.keys
    with caplog.at_level(logging.INFO, logger="sluice.api.keys"):
        watched.write(content)
        assert watched.settle() == [None, "refused"]
        for _ in range(5):
            assert watched.watcher.poll() is None
    assert watched.applied == []
    assert watched.watcher.keys is keys
    assert reloads("refused") == before + 1
    [error] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR
    message = error.getMessage()
    assert str(watched.path) in message
    assert says in message
    assert "The API keeps using the 5 API keys it had" in message


def test_a_good_version_after_a_bad_one_is_picked_up(watched: Watched) -> None:
    watched.write("[[keys]\nnot toml")
    assert watched.settle() == [None, "refused"]
    watched.write(without("producer"))
    assert watched.settle() == [None, "ok"]
    assert watched.applied[-1].caller_for(ROLE_KEYS["producer"]) is None


def test_a_removed_file_is_refused_and_its_return_applied(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    text = watched.path.read_text()
    watched.path.unlink()
    with caplog.at_level(logging.ERROR, logger="sluice.api.keys"):
        assert watched.settle() == [None, "refused"]
    assert "api_keys.toml does not exist" in caplog.text
    watched.write(text)
    assert watched.settle() == [None, "ok"]
    assert watched.applied[-1] == load_key_file(watched.path)[0]


def test_a_file_caught_half_written_is_never_loaded(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    full = without("viewer")
    with caplog.at_level(logging.WARNING, logger="sluice.api.keys"):
        watched.write(full[: len(full) // 3])  # the writer has not finished
        assert watched.watcher.poll() is None
        watched.write(full)
        assert watched.settle() == [None, "ok"]
    assert caplog.records == []
    assert len(watched.applied) == 1


async def test_the_running_api_refuses_a_removed_key_within_seconds(
    client: httpx.AsyncClient, reader: FakeReader, config_dir: Path
) -> None:
    assert (await client.get("/v1/exceptions", headers=as_role("viewer"))).status_code == 200
    (config_dir / "api_keys.toml").write_text(without("viewer"))
    started = time.monotonic()
    while (await client.get("/v1/exceptions", headers=as_role("viewer"))).status_code != 401:
        assert time.monotonic() - started < 5, "the removed key was still accepted after 5 s"
        await asyncio.sleep(0.1)
    assert (await client.get("/v1/exceptions", headers=as_role("operator"))).status_code == 200
