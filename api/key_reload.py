"""api_keys.toml is read again when it changes, so keys are added, removed or given another role
without restarting the API.

The lifespan in ``api.main`` loads the file with :func:`load_key_file` (an error there stops the
process, as any configuration error does) and runs :meth:`KeyFileWatcher.run`, which reads the file
once a second. A change is acted on once the same new content has been read twice in a row, so a file
caught half-written is never loaded; a removed key is refused about two seconds after the file
changed. The file is read whole rather than compared by mtime and size, which could miss a rewrite of
the same size within the file system's timestamp granularity; it is small, so this costs nothing.

New content that loads and lists at least one key replaces the keys in use. Content that does not
(not TOML, an invalid entry, no keys at all, the file removed or unreadable) is refused: the keys in use
stay, one ERROR names the file and the problem, and the same content is not tried again, so the log
gets one line per bad change, not one per second. Hence a bad edit never locks everyone out, and since
there is no key-less mode, nothing ever lets everyone in. Reloads are counted in
``sluice_api_keys_reloads_total{result="ok|refused"}`` and the keys in use, by role, in
``sluice_api_keys``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from app.telemetry import metrics
from schemas.config import ROLES, ApiKey, ApiKeys, ConfigError, parse_api_keys

log = logging.getLogger("sluice.api.keys")

INTERVAL_SECONDS = 1.0
RESULTS = ("ok", "refused")


def load_key_file(path: Path) -> tuple[ApiKeys, bytes]:
    """The keys in ``path`` and the content they came from; ConfigError when it cannot be loaded."""
    content = _read(path)
    if isinstance(content, str):
        raise ConfigError(f"{path} {content}")
    return parse_api_keys(path, content), content


def _read(path: Path) -> bytes | str:
    """The file's bytes, or why there are none (a phrase following the path)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


def count_by_role(keys: ApiKeys) -> dict[str, int]:
    counts = Counter(entry.role for entry in keys.keys)
    return {role: counts[role] for role in ROLES}


class KeyFileWatcher:
    """Reads api_keys.toml again when it changes and hands new keys to ``apply``.

    ``keys`` and ``content`` are what the process loaded at startup. :meth:`poll` reads the file
    once and acts on it as :meth:`run` does every ``interval`` seconds; tests call it directly.
    """

    def __init__(
        self,
        path: Path,
        keys: ApiKeys,
        content: bytes,
        apply: Callable[[ApiKeys], None],
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self.path = path
        self.keys = keys
        self.interval = interval
        self._apply = apply
        self._settled: bytes | str = content  # the content acted on last: in use, or refused
        self._candidate: bytes | str | None = None  # new content read once, to be read again
        metrics.declare_api_keys_reloads(RESULTS)
        metrics.set_api_keys(count_by_role(keys))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            content = await asyncio.to_thread(_read, self.path)
            try:
                self.consider(content)
            except Exception:
                # consider() marks the content settled before acting, so this is not repeated.
                log.exception(
                    "Reloading %s failed unexpectedly; the API keys in use stay in use", self.path
                )

    def poll(self) -> str | None:
        """Read the file once; what came of it (see :meth:`consider`)."""
        return self.consider(_read(self.path))

    def consider(self, content: bytes | str) -> str | None:
        """Act on what the file holds now: ``"ok"`` when new keys are in use, ``"refused"`` when
        the new content was refused, None when there is nothing to do yet."""
        if content == self._settled:
            self._candidate = None
            return None
        if content != self._candidate:
            self._candidate = content  # changed since the last read: wait until it stays put
            return None
        self._candidate = None
        self._settled = content
        return self._act(content)

    def _act(self, content: bytes | str) -> str:
        try:
            if isinstance(content, str):
                raise ConfigError(f"{self.path} {content}")
            keys = parse_api_keys(self.path, content)
            if not keys.keys:
                raise ConfigError(
                    f"{self.path} lists no API keys, and using it would refuse every request"
                )
        except ConfigError as exc:
            metrics.api_keys_reloaded("refused")
            log.error(
                "%s. The API keeps using the %d API keys it had; fix the file and it is read "
                "again within seconds.",
                exc,
                len(self.keys.keys),
            )
            return "refused"
        before, self.keys = self.keys, keys
        self._apply(keys)
        metrics.api_keys_reloaded("ok")
        metrics.set_api_keys(count_by_role(keys))
        log.info("Reloaded %s: %s", self.path, _changes(before, keys))
        return "ok"


def _changes(before: ApiKeys, after: ApiKeys) -> str:
    """What a reload changed, by tenant, key name and role (never digests)."""
    old, new = set(before.keys), set(after.keys)

    def names(entries: set[ApiKey]) -> str:
        return ", ".join(sorted(f"{k.tenant_id}/{k.name!r} ({k.role})" for k in entries)) or "none"

    return (
        f"{len(after.keys)} API keys in use; added or changed: {names(new - old)}; "
        f"removed or changed: {names(old - new)}"
    )
