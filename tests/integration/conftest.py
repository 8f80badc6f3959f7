"""Every test under tests/integration talks to the real broker and carries the integration marker.

`stack_factory` starts real `sluice worker` / `sluice api` processes for one test, with unique topic
and app names, tools pointing at a loopback mock server, and stops them (printing their logs on
failure) at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Names
from tests.support.mock_http import MockHTTPServer
from tests.support.stack import Stack

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def mock_server() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as server:
        yield server


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack_factory(
    kafka_bootstrap: str,
    names: Names,
    tmp_path: Path,
    mock_server: MockHTTPServer,
    request: pytest.FixtureRequest,
) -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def make(workers: int = 1, api: bool = True, env: dict[str, str] | None = None) -> Stack:
        stack = Stack(
            bootstrap=kafka_bootstrap,
            app_id=names.app_id,
            topic_prefix=names.topic_prefix,
            root=tmp_path,
            tools_url=mock_server.url,
            extra_env=env or {},
        )
        stacks.append(stack)
        await stack.prepare()
        for i in range(workers):
            stack.start_worker(i)
        if api:
            stack.start_api()
        stack.wait_ready()
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(stack.logs())  # noqa: T201 - shown by pytest only for the failed test


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
