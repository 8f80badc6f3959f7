"""Failure semantics against the real broker: poison, retries, dead letters, ordered quarantine,
redrive, worker crashes (SIGKILL) and a broker outage."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
from aiokafka import AIOKafkaProducer

from agents.intake import fingerprint, normalize_message
from app.kafka_local import LocalKafka, free_port
from schemas.codec import decode, encode
from schemas.events import ExceptionReport
from tests.conftest import Names
from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import CHAIN, PAYMENT, get, ingested, post
from tests.support.mock_http import MockHTTPServer
from tests.support.stack import PARTITIONS, Stack, partition_of


def keys_on(partition: int, prefix: str, n: int) -> list[str]:
    """``n`` keys that the default partitioner puts on ``partition``."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        key = f"{prefix}-{i}"
        if partition_of(key.encode()) == partition:
            found.append(key)
        i += 1
    return found


POISON = {
    "malformed": b"{not json",
    "invalid": orjson.dumps({"event_type": "ExceptionIngested", "tenant_id": "acme"}),
}


def unknown_version(exception_id: str) -> bytes:
    raw = orjson.loads(encode(ingested(exception_id, 0)))
    raw["schema_version"] = 99
    return orjson.dumps(raw)


async def test_poison_lands_in_each_stages_dlq_and_the_partition_keeps_flowing(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(api=False)
    t = stack.topics
    stage_topics = {
        "intake": t.ingested,
        "group": t.fingerprinted,
        "triage": t.accepted,
        "policy": t.triaged,
        "playbook": t.decided,
        "tool": t.planned,
    }
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
    await producer.start()
    injected: dict[str, list[tuple[bytes, bytes]]] = {}
    try:
        for stage, topic in stage_topics.items():
            k1, k2, k3 = keys_on(0, f"poison-{stage}", 3)
            records = [
                (k1.encode(), POISON["malformed"]),
                (k2.encode(), POISON["invalid"]),
                (k3.encode(), unknown_version(k3)),
            ]
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key)
            injected[stage] = records
    finally:
        await producer.stop()

    # Valid exceptions behind the poison, on partition 0 of every stage topic: exception ids that
    # hash to 0, and messages whose grouping key (tenant:fingerprint) hashes to 0 as well.
    behind = []
    words = (f"hub {a}{b}" for a in "abcdefghij" for b in "klmnopqrst")
    for exception_id in keys_on(0, "after-poison", 3):
        while True:
            report = ExceptionReport(
                source="shipping", error_type="ShipmentStuck", message=f"stuck at {next(words)}"
            )
            fp = fingerprint("acme", "shipping", "ShipmentStuck", normalize_message(report.message))
            if partition_of(f"acme:{fp}".encode()) == 0:
                break
        event = ingested(exception_id, 0)
        behind.append(
            event.model_copy(
                update={"payload": event.payload.model_copy(update={"report": report})}
            )
        )
    await stack.produce_events(t.ingested, behind)

    for stage, records in injected.items():
        dead = await stack.read_topic(t.dlq(stage), expect=3)
        assert [(r.key, r.value) for r in dead] == records, f"{stage}: raw bytes or key changed"
        kinds = []
        for r, (_key, _value) in zip(dead, records, strict=True):
            headers = {k: v.decode() for k, v in r.headers}
            assert headers["sluice.original.topic"] == stage_topics[stage]
            assert headers["sluice.original.partition"] == "0"
            assert int(headers["sluice.original.offset"]) >= 0
            assert headers["sluice.stage"] == stage
            assert headers["sluice.error.class"] == "poison"
            assert headers["sluice.error.message"]
            assert headers["sluice.error.attempts"] == "1"
            assert headers["sluice.error.first_failure_at"]
            assert headers["sluice.error.last_failure_at"]
            assert headers["sluice.exception_id"] == r.key.decode()
            kinds.append(headers["sluice.error.kind"])
        assert kinds == ["malformed", "invalid", "unknown_schema_version"]

    completed = await stack.read_topic(t.completed, expect=3)
    assert sorted(decode(r.value).exception_id for r in completed) == sorted(
        e.exception_id for e in behind
    )


async def test_a_dead_letter_inside_a_batch_quarantines_on_its_own_partition(
    stack_factory: StackFactory,
) -> None:
    """A batch holds records of several partitions. A dead letter first acks what the batch did
    before it, and its quarantine must still land on the dead-lettered exception's partition:
    there the exception's next event looks for it and parks behind it (elsewhere it would not see
    it, and would run ahead of its own dead letter)."""
    stack = await stack_factory(workers=0, api=False)  # everything is waiting when it starts
    t = stack.topics
    flowing = [ingested(x, 0) for p in range(PARTITIONS) for x in keys_on(p, "flowing", 5)]
    poisoned = [keys_on(p, "poisoned", 1)[0] for p in range(1, PARTITIONS)]
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
    await producer.start()
    try:
        for exception_id in poisoned:  # first on their partitions, behind other partitions' records
            await producer.send_and_wait(t.ingested, POISON["malformed"], key=exception_id.encode())
    finally:
        await producer.stop()
    # Each poisoned exception's next event right behind its poison, then the flowing ones.
    await stack.produce_events(t.ingested, [ingested(x, 1) for x in poisoned] + flowing)
    stack.start_worker(0)
    stack.wait_ready()

    out = await stack.read_topic(t.fingerprinted, expect=len(flowing))
    assert sorted(decode(r.value).exception_id for r in out) == sorted(
        e.exception_id for e in flowing
    ), "an event behind its exception's dead letter was processed instead of parked"
    notes = [decode(r.value) for r in await stack.read_topic(t.operations, expect=len(poisoned))]
    # The intake stage parks each one and says so; the projection, which read the poison too,
    # parks the same event and that note without a note of its own (it would read and park it).
    parked = [(n.exception_id, n.payload.stage) for n in notes if n.event_type == "ExceptionParked"]
    assert sorted(parked) == sorted((x, "intake") for x in poisoned)
    assert await stack.misplaced_table_writes() == []


async def test_transient_tool_failures_are_retried_and_retry_after_honoured(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    mock_server.fail("/tickets", 503, times=2)
    mock_server.fail("/notify", 429, times=1, retry_after=1)
    resp = await post(stack, PAYMENT)
    exception_id = resp.json()["exception_id"]
    state = await stack.wait_for_state(exception_id, {"resolved", "dead_lettered"})
    assert state["status"] == "resolved"

    tickets = mock_server.calls("/tickets")
    assert len(tickets) == 3, "503, 503, then success"
    assert len({c.idempotency_key for c in tickets}) == 1, "retries carry the same key"
    assert state["tool_results"][0]["detail"]["attempts"] == 3
    notify = mock_server.calls("/notify")
    assert len(notify) == 2
    assert notify[1].at - notify[0].at >= 1.0, "Retry-After: 1 was not honoured"


async def test_past_the_bound_dead_letters_parks_later_events_and_redrive_completes_in_order(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    mock_server.fail("/hooks/acme", 503, times=1000)  # the callback step's endpoint is down
    exception_id = (await post(stack, PAYMENT)).json()["exception_id"]
    state = await stack.wait_for_state(exception_id, {"dead_lettered"})
    assert state["quarantine"]["stage"] == "tool"
    assert state["quarantine"]["error_class"] == "transient"
    assert state["quarantine"]["attempts"] == 3
    assert len(mock_server.calls("/hooks/acme")) == 3

    # Two later events of the same exception reach the tool stage and are parked behind it.
    later = [ingested(exception_id, n) for n in (1, 2)]
    later = [
        e.model_copy(
            update={"payload": e.payload.model_copy(update={"report": _payment_report(n)})}
        )
        for n, e in enumerate(later, start=1)
    ]
    await stack.produce_events(stack.topics.ingested, later)
    deadline = time.monotonic() + 60
    while (await get(stack, f"/v1/exceptions/{exception_id}")).json()["parked"] < 2:
        assert time.monotonic() < deadline, "the later events were not parked"
        await asyncio.sleep(0.3)

    dlq = (await get(stack, "/v1/dlq")).json()["items"]
    assert [(e["stage"], e["exception_id"], e["parked_count"]) for e in dlq] == [
        ("tool", exception_id, 2)
    ]
    # Nothing of the parked events was executed.
    assert len(mock_server.calls("/tickets")) == 1

    mock_server.heal()
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        resp = await client.post(
            f"/v1/exceptions/{exception_id}/redrive",
            json={"reason": "webhook endpoint fixed"},
            headers=stack.headers(),
        )
    assert resp.status_code == 202, resp.text
    assert resp.json()["stage"] == "tool"

    completed = await stack.read_topic(stack.topics.completed, expect=3)
    chains = [decode(r.value).correlation_id for r in completed]
    first_chain = next(
        e["correlation_id"]
        for e in (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
        if e["event_type"] == "ExceptionIngested"
    )
    assert [str(c) for c in chains] == [first_chain] + [str(e.correlation_id) for e in later]
    state = await stack.wait_for_state(exception_id, {"resolved"})
    assert state["quarantine"] is None and state["parked"] == 0
    # The redrive replayed the original plan's ticket and page from the ledger: one call each;
    # its callback was tried 3 times before the dead letter and once more after the redrive.
    for path in ("/tickets", "/notify"):
        keys = Counter(c.idempotency_key for c in mock_server.calls(path))
        assert len(keys) == 3 and set(keys.values()) == {1}, (path, keys)
    hooks = Counter(c.idempotency_key for c in mock_server.calls("/hooks/acme"))
    assert sorted(hooks.values()) == [1, 1, 4], hooks
    types = [
        e["event_type"] for e in (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
    ]
    for expected in (
        "ExceptionDeadLettered",
        "ExceptionParked",
        "ExceptionRedriveRequested",
        "ExceptionQuarantineLifted",
    ):
        assert expected in types
    assert (await get(stack, "/v1/dlq")).json()["items"] == []


def _payment_report(n: int) -> ExceptionReport:
    return ExceptionReport(
        source="payments",
        error_type="PaymentDeclined",
        message=f"Card declined again, attempt {n}",
        attributes={"n": n},
    )


async def test_discard_drops_the_dead_letter_with_a_reason(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    mock_server.fail("/hooks/acme", 400, times=1)  # permanent: no retry
    exception_id = (await post(stack, PAYMENT)).json()["exception_id"]
    state = await stack.wait_for_state(exception_id, {"dead_lettered"})
    assert state["quarantine"]["error_class"] == "permanent"
    assert len(mock_server.calls("/hooks/acme")) == 1
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        missing = await client.post(
            f"/v1/exceptions/{exception_id}/discard", json={}, headers=stack.headers()
        )
        assert missing.status_code == 422  # a reason is required
        other = await client.post(
            f"/v1/exceptions/{exception_id}/discard",
            json={"reason": "not mine"},
            headers=stack.headers("globex"),
        )
        assert other.status_code == 404  # another tenant cannot touch it
        resp = await client.post(
            f"/v1/exceptions/{exception_id}/discard",
            json={"reason": "refunded by hand"},
            headers=stack.headers(),
        )
    assert resp.status_code == 202, resp.text
    state = await stack.wait_for_state(exception_id, {"discarded"})
    events = (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
    lifted = [e for e in events if e["event_type"] == "ExceptionQuarantineLifted"]
    assert lifted and lifted[0]["payload"]["action"] == "discard"
    assert lifted[0]["payload"]["reason"] == "refunded by hand"


async def test_sigkill_crashes_lose_nothing_and_call_no_tool_twice(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    total = 2000
    reports = [
        {"source": "shipping", "error_type": "ShipmentStuck", "message": f"Parcel {i} stuck"}
        for i in range(total)
    ]
    accepted = await _post_batches(stack, reports)

    rng = random.Random(7)  # noqa: S311 - test timing, not security
    kills = 0
    for _ in range(5):
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        stack.stop_worker(0, signal.SIGKILL)
        kills += 1
        stack.start_worker(0)
        stack.wait_ready(timeout=120)
    assert kills == 5

    await _assert_each_finished_once(stack, mock_server, accepted)
    # Every exception's stage events are in chain order.
    sample = rng.sample(accepted, 200)
    for exception_id in sample:
        events = (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
        chain = [e["event_type"] for e in events if e["event_type"] in CHAIN]
        assert chain == CHAIN[: len(chain)] and len(chain) >= 5, (exception_id, chain)
        seqs = [e["sequence"] for e in events if e["event_type"] in CHAIN]
        assert seqs == sorted(seqs)


async def test_rebalances_under_load_lose_nothing_and_call_no_tool_twice(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    """Partitions move while records are buffered and in flight: a second worker joins, leaves
    gracefully, joins again, and then the first one is killed. None of that may lose an exception
    or repeat a tool call (app/consumer.py lists what Faust's own consumer got wrong here)."""
    stack = await stack_factory()
    total = 2000
    accepted = await _post_batches(
        stack,
        [
            {"source": "billing", "error_type": "InvoiceStuck", "message": f"Invoice {i} stuck"}
            for i in range(total)
        ],
    )

    await asyncio.sleep(1.5)
    stack.start_worker(1)  # joins: half the partitions move to it
    stack.wait_ready(timeout=120)
    await asyncio.sleep(3.0)
    assert stack.stop_worker(1, signal.SIGTERM) == 0  # leaves: they move back
    await asyncio.sleep(2.0)
    stack.start_worker(1)
    stack.wait_ready(timeout=120)
    await asyncio.sleep(2.0)
    stack.stop_worker(0, signal.SIGKILL)  # dies: its partitions go once its session times out
    stack.start_worker(0)
    stack.wait_ready(timeout=120)

    await _assert_each_finished_once(stack, mock_server, accepted)
    # both workers hold partitions at the end
    for i in range(2):
        stats = httpx.get(f"{stack.worker_url(i)}/sluice/stats", params={"local": "1"}).json()
        assert stats["assigned_partitions"] > 0, f"worker {i} holds no partitions"


async def _assert_each_finished_once(
    stack: Stack, mock_server: MockHTTPServer, accepted: list[str]
) -> None:
    """After crashes or rebalances: every accepted exception ends resolved or dead-lettered, no
    tool call was made twice with one idempotency key, and every dead letter is an in-doubt call
    (a worker gone between call and ledger), never called again."""
    terminal = await _wait_terminal(stack, set(accepted), timeout=600)
    outcomes = Counter(terminal.values())
    assert set(outcomes) <= {"resolved", "dead_lettered"}, outcomes
    assert sum(outcomes.values()) == len(accepted)
    duplicates = {k: n for k, n in mock_server.calls_by_idempotency_key().items() if n > 1}
    assert duplicates == {}, await _explain_duplicates(stack, mock_server, duplicates)
    assert await stack.misplaced_table_writes() == []
    for exception_id, status in terminal.items():
        if status == "dead_lettered":
            state = (await get(stack, f"/v1/exceptions/{exception_id}")).json()
            assert state["quarantine"]["error_class"] == "in_doubt", state


async def _explain_duplicates(
    stack: Stack, mock_server: MockHTTPServer, duplicates: dict[str, int]
) -> str:
    """For a failure: when each repeated call came, against the worker's log, and what the
    exception's history says of the step (its attempts), for the first few repeated keys."""
    lines = [f"{len(duplicates)} idempotency keys were called more than once"]
    for key in sorted(duplicates)[:5]:
        times = [
            time.strftime("%H:%M:%S", time.gmtime(r.at)) + f".{int(r.at % 1 * 1000):03d}"
            for r in mock_server.calls()
            if r.idempotency_key == key
        ]
        exception_id = key.split(":", 1)[0]
        events = (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
        if not isinstance(events, list):  # an error body: nothing to show
            events = []
        steps = [
            (
                e["event_type"],
                e["sequence"],
                [
                    (
                        r["step_id"],
                        r["status"],
                        r.get("detail", {}).get("attempts"),
                        r.get("replayed"),
                    )
                    for r in e["payload"].get("results", [])
                ],
            )
            for e in events
            if e["event_type"] in ("ExceptionPlanned", "ExceptionCompleted")
        ]
        lines.append(f"{key}: calls at {times} UTC; {steps}")
    return "\n".join(lines)


async def _post_batches(stack: Stack, reports: list[dict[str, str]]) -> list[str]:
    """POST the reports through the batch endpoint, 200 at a time; their exception ids."""
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        for start in range(0, len(reports), 200):
            resp = await client.post(
                "/v1/exceptions:batch",
                json={"items": reports[start : start + 200]},
                headers=stack.headers(),
            )
            assert resp.status_code == 200, resp.text
            for item in resp.json()["results"]:
                assert item["status_code"] == 202, item
                accepted.append(item["exception_id"])
    assert len(accepted) == len(reports)
    return accepted


async def _wait_terminal(
    stack: Stack, ids: set[str], timeout: float, stalled_after: float = 180.0
) -> dict[str, str]:
    """Wait until every id is resolved or dead-lettered. Fails at ``timeout``, or sooner when no
    more finished for ``stalled_after`` seconds, naming where each missing one stands."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    done, progress_at = 0, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - progress_at < stalled_after:
        states = await _terminal_states(stack)
        if ids <= set(states):
            return {k: v for k, v in states.items() if k in ids}
        if len(states) > done:
            done, progress_at = len(states), time.monotonic()
        await asyncio.sleep(2)
    missing = sorted(ids - set(states))
    where = [await _where_is(stack, exception_id) for exception_id in missing[:10]]
    in_kafka = await stack.trace_in_kafka(missing[:10])
    raise AssertionError(
        f"{len(missing)} exceptions never finished: "
        + "; ".join(where)
        + f"\nIn Kafka:\n{in_kafka}\n{stack.logs()}"
    )


async def _where_is(stack: Stack, exception_id: str) -> str:
    """One unfinished exception: its status and stage, and the history it has, for a failure."""
    resp = await get(stack, f"/v1/exceptions/{exception_id}")
    if resp.status_code != 200:
        return f"{exception_id}: HTTP {resp.status_code}"
    state = resp.json()
    events = (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
    history = [e["event_type"] for e in events] if isinstance(events, list) else events
    return f"{exception_id}: {state.get('status')} at {state.get('stage')}, history {history}"


async def _terminal_states(stack: Stack) -> dict[str, str]:
    """Resolved and dead-lettered exceptions by id; empty while a worker is not ready to answer."""
    states: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        for status in ("resolved", "dead_lettered"):
            cursor = None
            while True:
                params = {"status": status, "limit": "200"}
                if cursor:
                    params["cursor"] = cursor
                resp = await client.get("/v1/exceptions", params=params, headers=stack.headers())
                if resp.status_code == 503:
                    return {}  # a worker is still recovering after a restart
                assert resp.status_code == 200, resp.text
                page = resp.json()
                for item in page["items"]:
                    states[item["exception_id"]] = item["status"]
                cursor = page.get("next_cursor")
                if not cursor:
                    break
    return states


async def test_broker_outage_answers_503_and_loses_nothing(
    names: Names, tmp_path: Path, mock_server: MockHTTPServer
) -> None:
    broker = LocalKafka(tmp_path / "kafka", port=free_port())
    broker.start()
    stack = Stack(
        bootstrap=broker.bootstrap_servers,
        app_id=names.app_id,
        topic_prefix=names.topic_prefix,
        root=tmp_path,
        tools_url=mock_server.url,
    )
    try:
        await stack.prepare()
        stack.start_worker(0)
        stack.start_api()
        stack.wait_ready()
        before = [(await post(stack, {**PAYMENT, "external_ref": f"b{i}"})) for i in range(5)]
        assert {r.status_code for r in before} == {202}

        broker.stop()
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
            down = await client.post("/v1/exceptions", json=PAYMENT, headers=stack.headers())
            assert down.status_code == 503, down.text
            assert "retry-after" in down.headers
            assert (await client.get("/readyz")).status_code == 503
            worker_ready = await client.get(f"{stack.worker_url(0)}/sluice/ready")
            assert worker_ready.status_code == 503, worker_ready.text
            assert (await client.get("/healthz")).status_code == 200  # alive, just not ready

        broker.start()
        after = []
        deadline = time.monotonic() + 120
        while len(after) < 5 and time.monotonic() < deadline:
            resp = await post(stack, {**PAYMENT, "external_ref": f"a{len(after)}"})
            if resp.status_code == 202:
                after.append(resp)
            else:
                assert resp.status_code == 503
                await asyncio.sleep(1)
        assert len(after) == 5
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
            assert (await client.get("/readyz")).status_code == 200
            deadline = time.monotonic() + 60
            while (await client.get(f"{stack.worker_url(0)}/sluice/ready")).status_code != 200:
                assert time.monotonic() < deadline, "the worker never became ready again"
                await asyncio.sleep(0.5)
        for resp in [*before, *after]:
            await stack.wait_for_state(resp.json()["exception_id"], {"resolved"}, timeout=180)
    finally:
        stack.stop()
        broker.stop()
