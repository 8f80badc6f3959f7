"""The worker's RocksDB stores share one cache and one memtable budget (app.rocks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from faust.stores.rocksdb import RocksDBOptions
from pydantic import ValidationError
from rocksdict import Rdict

from app import rocks
from app.rocks import AtMostEvery, MiB, SharedMemoryOptions, scan_from, shared_memory
from app.settings import Settings, get_settings

OPTIONS: dict[str, Any] = {
    "write_buffer_size": MiB,
    "max_write_buffer_number": 2,
    "max_open_files": 32,
}
KEYS = 100_000


def fill(db: Rdict) -> None:
    """Write KEYS keys, flush them to an SST file and read some back."""
    for i in range(KEYS):
        db[f"exception-{i:08d}".encode()] = os.urandom(64)
    db.flush()
    for i in range(0, KEYS, 997):
        assert db[f"exception-{i:08d}".encode()]


def prop(db: Rdict, name: str) -> int:
    value = db.property_int_value(f"rocksdb.{name}")
    assert value is not None, name
    return value


def test_every_instance_uses_the_one_cache_and_keeps_index_and_filters_in_it(
    tmp_path: Path,
) -> None:
    shared = shared_memory()
    ours = [SharedMemoryOptions(**OPTIONS).open(tmp_path / f"ours-{n}") for n in range(2)]
    # Faust's own options: a cache per instance, index and filters outside it
    theirs = RocksDBOptions(**OPTIONS, block_cache_size=2 * MiB).open(tmp_path / "faust")
    try:
        for db in (*ours, theirs):
            fill(db)

        for db in ours:
            assert prop(db, "block-cache-capacity") == get_settings().table_cache_mib * MiB
        assert prop(theirs, "block-cache-capacity") == 2 * MiB
        assert shared.cache.get_usage() >= prop(ours[0], "block-cache-usage") > 0
        # index and bloom filter of 100k keys: held by the table reader in Faust's setup, and
        # charged to the bounded cache in ours
        assert prop(theirs, "estimate-table-readers-mem") > 3 * prop(
            ours[0], "estimate-table-readers-mem"
        )
    finally:
        for db in (*ours, theirs):
            db.close()


def test_memtables_are_charged_to_the_write_buffer_budget(tmp_path: Path) -> None:
    shared = shared_memory()
    before = shared.write_buffers.get_usage()
    db = SharedMemoryOptions(**OPTIONS).open(tmp_path / "db")
    try:
        for i in range(5_000):
            db[f"k{i}".encode()] = os.urandom(100)
        assert prop(db, "cur-size-all-mem-tables") > 500_000
        assert shared.write_buffers.get_usage() >= before + prop(db, "cur-size-all-mem-tables")
        assert shared.write_buffers.enabled()
        assert (
            shared.write_buffers.get_buffer_size() == get_settings().table_write_buffers_mib * MiB
        )
    finally:
        db.close()


def test_a_memtable_budget_as_large_as_the_cache_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_TABLE_CACHE_MIB", "32")
    monkeypatch.setenv("SLUICE_TABLE_WRITE_BUFFERS_MIB", "32")
    with pytest.raises(ValidationError, match="SLUICE_TABLE_WRITE_BUFFERS_MIB must be less than"):
        Settings()


def test_persisted_offsets_are_written_at_most_once_per_interval_per_partition() -> None:
    now = [100.0]
    writes = AtMostEvery(1.0, clock=lambda: now[0])

    assert writes.due("changelog-0")  # the first write of a partition always goes through
    assert writes.due("changelog-1")  # each partition on its own
    now[0] += 0.4
    assert not writes.due("changelog-0")
    now[0] += 0.6
    assert writes.due("changelog-0")
    assert not writes.due("changelog-0")


def test_a_scan_goes_in_key_order_from_its_start_or_the_key_after_it(tmp_path: Path) -> None:
    db = SharedMemoryOptions(**OPTIONS).open(tmp_path / "db")
    try:
        for key in (b"exc-3", b"exc-1", b"exc-2", b"exc-5"):
            db[key] = b"v:" + key
        db.flush()

        assert [k for k, _ in scan_from(db, None)] == [b"exc-1", b"exc-2", b"exc-3", b"exc-5"]
        assert list(scan_from(db, b"exc-3")) == [(b"exc-3", b"v:exc-3"), (b"exc-5", b"v:exc-5")]
        assert [k for k, _ in scan_from(db, b"exc-4")] == [b"exc-5"]
        assert list(scan_from(db, b"exc-6")) == []
    finally:
        db.close()


def test_rocksdb_s_info_log_is_cut_and_its_old_files_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rocks, "INFO_LOG_BYTES", 8 * 1024)
    db = SharedMemoryOptions(**OPTIONS).open(tmp_path / "db")
    try:
        for i in range(300):  # every flush writes lines to the info log
            db[f"k{i}".encode()] = os.urandom(64)
            db.flush()
    finally:
        db.close()

    logs = sorted(p for p in (tmp_path / "db").iterdir() if p.name.startswith("LOG"))
    assert "LOG" in {p.name for p in logs}
    assert len(logs) <= rocks.INFO_LOG_FILES
    assert sum(p.stat().st_size for p in logs) < rocks.INFO_LOG_FILES * 64 * 1024


def test_a_table_with_a_ttl_keeps_its_records_however_often_it_is_reopened(
    tmp_path: Path,
) -> None:
    """A worker reopens its tables at every start. Each open of a TTL instance used to wrap the
    TTL compaction filter persisted in the folder in one more, and from the fourth open on the
    nested filters read bytes of the values as expiry times: compaction dropped every record."""
    path = tmp_path / "tool-ledger-3.db"
    value = b'{"t":1795348186.1,"r":{"step_id":"log","attempts":1},"replayed":false}}'
    written: list[bytes] = []
    for start in range(6):
        db = SharedMemoryOptions(**OPTIONS, ttl=7 * 86_400).open(path)
        try:
            keys = [f"start-{start}-key-{i}".encode() for i in range(100)]
            for key in keys:
                db[key] = value
            written += keys
            db.flush()
            db.compact_range(None, None)
            assert len(list(db.keys())) == len(written), f"records lost at open {start + 1}"
            assert all(db[key] == value for key in written)
        finally:
            db.close()
    [latest] = sorted(path.glob("OPTIONS-*"))[-1:]
    assert latest.read_text().count("id=TtlCompactionFilterFactory") == 1
