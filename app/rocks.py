"""RocksDB for the worker's tables under one memory budget per process.

A worker opens one RocksDB instance per table and partition: 88 at the default 8 partitions.
Faust's rocksdict driver gives every instance a block cache of its own and keeps each SST file's
index and bloom filter in memory outside any cache, so a worker's memory grew with the number of
instances and with the number of keys stored. Here every instance of the process shares:

- one LRU block cache (``settings.table_cache_mib``) that also holds the index and filter blocks,
  with level-0 ones pinned so the newest files never have to be read back from disk;
- one write buffer manager (``settings.table_write_buffers_mib``) that bounds the memtables of all
  instances together and charges them to that cache.

So RocksDB's memory is about ``table_cache_mib`` however many tables, partitions or keys there are,
plus each instance's one mutable memtable (``settings.table_write_buffer_kib``) while it fills.

The store also writes each partition's changelog offset at most once a second (see
:meth:`Store.set_persisted_offset`) instead of at the ack of every table write.

Tables select this store with the ``sluice-rocksdb://`` URL (registered with Faust below).
:func:`table_memory` reads what RocksDB reports for each table, for the worker's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import rocksdict
from faust.stores import STORES
from faust.stores import rocksdb as faust_rocksdb
from faust.types import TP

from app.settings import get_settings

STORE_URL = "sluice-rocksdb://"
STORES.aliases["sluice-rocksdb"] = "app.rocks:Store"

MiB = 1024 * 1024
# How often a partition's persisted changelog offset is written at most (seconds).
OFFSET_WRITE_INTERVAL = 1.0


@dataclass(frozen=True)
class SharedMemory:
    """The cache and write buffer manager every RocksDB instance of this process shares."""

    cache: rocksdict.Cache
    write_buffers: rocksdict.WriteBufferManager
    cache_bytes: int
    write_buffers_bytes: int


@lru_cache(maxsize=1)
def shared_memory() -> SharedMemory:
    """This process's cache and write buffer manager, made on first use from the settings."""
    settings = get_settings()
    cache_bytes = settings.table_cache_mib * MiB
    write_buffers_bytes = settings.table_write_buffers_mib * MiB
    cache = rocksdict.Cache(cache_bytes)
    return SharedMemory(
        cache=cache,
        # allow_stall=False: past the budget RocksDB flushes sooner, it never blocks the writers
        write_buffers=rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            write_buffers_bytes, False, cache
        ),
        cache_bytes=cache_bytes,
        write_buffers_bytes=write_buffers_bytes,
    )


# RocksDB's own info log (the LOG file of each instance) gains about 5 KB at every flush and more at
# compactions, and by default it is never cut. At 1M exceptions the fingerprint-groups folders took
# 276.3 MiB on disk for 3.0 MiB of SST files (performance.md, session 5). Two files of this size.
INFO_LOG_BYTES = MiB
INFO_LOG_FILES = 2


class SharedMemoryOptions(faust_rocksdb.RocksDBOptions):
    """Faust's RocksDB options, but with the process's shared cache and write buffer manager."""

    def open(self, path: Path, *, read_only: bool = False) -> rocksdict.Rdict:
        """Open one instance with these options, given for its one column family as well.

        Given only the database's options, rocksdict reads the column family's back from the
        OPTIONS file RocksDB keeps in the folder. For a table with a TTL (the idempotency tables
        and the tool ledger) those hold the TTL compaction filter, and RocksDB wraps it in one
        more at every open: from the fourth open of a folder on, the nested filters took bytes of
        each value for expiry times and compactions dropped every record, so a worker restarted a
        few times forgot what it had processed and called tools again. Faust's own ``open`` also
        sets ``db_paths`` on an options object it then does not pass; it is left out here."""
        access = (
            rocksdict.AccessType.read_write()
            if self.ttl is None
            else rocksdict.AccessType.with_ttl(self.ttl)
        )
        db = rocksdict.Rdict(
            str(path),
            options=self.as_options(),
            column_families={"default": self.as_options()},
            access_type=access,
        )
        db.set_read_options(rocksdict.ReadOptions())
        return db

    def as_options(self) -> rocksdict.Options:
        shared = shared_memory()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        if self.max_open_files is not None:
            options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(shared.write_buffers)
        options.set_max_log_file_size(INFO_LOG_BYTES)
        options.set_keep_log_file_num(INFO_LOG_FILES)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(shared.cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


class AtMostEvery:
    """Tells, per key, whether ``interval`` seconds have passed since it was last due."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: dict[Hashable, float] = {}

    def due(self, key: Hashable) -> bool:
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self.last[key] = now
        return True


def scan_from(db: rocksdict.Rdict, start: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """``db``'s items in key order from ``start`` (or the key after it), without caching the blocks
    read: a scan reads each record once and must not push the hot ones out of the shared cache."""
    once = rocksdict.ReadOptions()
    once.fill_cache(False)  # type: ignore[call-arg]  # the stub forgets the flag the method takes
    return cast(Iterator[tuple[bytes, bytes]], db.items(from_key=start, read_opt=once))


class Store(faust_rocksdb.Store):
    """Faust's RocksDB store (rocksdict driver) with :class:`SharedMemoryOptions`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust popped "driver" and "read_only" out of self.options; the rest are RocksDB options.
        self.use_rocksdict = True
        self.rocksdb_options = SharedMemoryOptions(**(self.options or {}), use_rocksdict=True)
        self._offset_writes = AtMostEvery(OFFSET_WRITE_INTERVAL)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Write the changelog offset up to which this partition's store is current, at most once
        per :data:`OFFSET_WRITE_INTERVAL` per partition.

        Faust calls this at the broker's ack of every changelog record, so each table write cost a
        second RocksDB write (a profile of the batched worker put it at 4 % of the event loop's
        time). Recovery reads the changelog from this offset on and writes each record's value into
        the store, so an offset that lags by up to a second only makes it apply again records the
        store already holds, ending in the same values; it is never ahead of the data."""
        if self._offset_writes.due(tp):
            super().set_persisted_offset(tp, offset)

    def items_from(self, partition: int, start: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """The raw keys and values of this worker's store of ``partition``, in key order from
        ``start`` (from the first key if None); nothing if the worker does not hold it."""
        db = self._dbs.get(partition)
        return iter(()) if db is None else scan_from(db, start)

    def memory(self) -> dict[str, int]:
        """What RocksDB reports for this table's open partitions, summed."""
        totals = dict.fromkeys(_PROPERTIES, 0)
        for db in list(self._dbs.values()):
            for name, prop in _PROPERTIES.items():
                try:
                    value = db.property_int_value(prop)
                except rocksdict.DbClosedError:  # closed by a rebalance since the list was taken
                    break
                totals[name] += value or 0
        totals["partitions"] = len(self._dbs)
        return totals


_PROPERTIES = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "table_readers": "rocksdb.estimate-table-readers-mem",
    "sst_files": "rocksdb.total-sst-files-size",
    "keys_estimate": "rocksdb.estimate-num-keys",
}


def table_memory(tables: Any) -> dict[str, dict[str, int]]:
    """Per table (of a Faust TableManager) what :meth:`Store.memory` reports, for tables whose
    store is open; tables on another store are left out."""
    report: dict[str, dict[str, int]] = {}
    for name, table in list(tables.items()):
        data = getattr(table, "_data", None)
        if isinstance(data, Store):
            report[name] = data.memory()
    return report


def cache_usage() -> dict[str, int]:
    """The shared cache and write buffer manager: capacity, usage, pinned usage (bytes)."""
    shared = shared_memory()
    return {
        "cache_capacity": shared.cache_bytes,
        "cache_usage": shared.cache.get_usage(),
        "cache_pinned": shared.cache.get_pinned_usage(),
        "write_buffers_limit": shared.write_buffers_bytes,
        "write_buffers_usage": shared.write_buffers.get_usage(),
    }
