"""The access store: what was read, by whom, and what was mounted, kept on
the node in SQLite (`<state_path>/access.db`) so `tapio-node report` can
answer dead-config, least-privilege, blast-radius and new-reader questions.

The event loop only touches dicts: add() aggregates each attributed access
group into one in-memory row per (owner, object, key, accessor, command);
tick(), called from the loop's periodic turn (once a second), hands the
rows gathered since to a writer thread, which upserts them in one
transaction. A failing store (disk full, read-only, locked, corrupt) is
logged and counted; collection goes on, and rows that could not be
written are kept (bounded) for the next try.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable

from tapio_node.store.schema import ACCESS_KEY, MOUNT_KEY, MOUNT_NAMES, SCHEMA_VERSION, StoreError, db_path, open_ro, open_rw

__all__ = ["AccessStore", "StoreError", "open_ro", "db_path", "SCHEMA_VERSION", "ERROR_OPERATIONS"]

log = logging.getLogger("tapio_node.store")

# Distinct rows kept in memory between writes (and for a failing store):
# beyond this a new row is dropped and counted, never the daemon's memory.
MAX_PENDING_ROWS = 100_000
# (accessor workload, object) pairs remembered for new-reader alerts.
MAX_KNOWN_PAIRS = 200_000
PRUNE_SECONDS = 3600.0
ERROR_LOG_SECONDS = 60.0
ERROR_OPERATIONS = ("open", "write", "prune")

_COLS = ", ".join(ACCESS_KEY)
_UPSERT_ACCESS = (
    f"INSERT INTO accesses ({_COLS}, cross_pod, count, first_seen, last_seen) "
    f"VALUES ({', '.join('?' * (len(ACCESS_KEY) + 4))}) "
    f"ON CONFLICT ({_COLS}) DO UPDATE SET count = count + excluded.count, "
    "first_seen = min(first_seen, excluded.first_seen), "
    "last_seen = max(last_seen, excluded.last_seen), "
    "cross_pod = max(cross_pod, excluded.cross_pod)")
_MCOLS = ", ".join(MOUNT_KEY + MOUNT_NAMES)
_UPSERT_MOUNT = (
    f"INSERT INTO mounts ({_MCOLS}, first_mounted, last_mounted) "
    f"VALUES ({', '.join('?' * (len(MOUNT_KEY) + len(MOUNT_NAMES) + 2))}) "
    f"ON CONFLICT ({', '.join(MOUNT_KEY)}) DO UPDATE SET "
    "last_mounted = max(last_mounted, excluded.last_mounted), "
    + ", ".join(f"{c} = CASE WHEN excluded.{c} != '' THEN excluded.{c} ELSE {c} END"
                for c in MOUNT_NAMES))

# Positions in an access key (schema.ACCESS_KEY).
_I = {c: i for i, c in enumerate(ACCESS_KEY)}
OWNER_NS, OBJ_KIND, OBJ_NAME = _I["owner_namespace"], _I["object_kind"], _I["object_name"]
ACC_KIND, ACC_NS, ACC_WORKLOAD = _I["accessor_kind"], _I["accessor_namespace"], _I["accessor_workload"]


def pair_of(key: tuple) -> tuple:
    """(accessor kind, namespace, workload, object namespace, kind, name) of an access key."""
    return (key[ACC_KIND], key[ACC_NS], key[ACC_WORKLOAD], key[OWNER_NS], key[OBJ_KIND], key[OBJ_NAME])


class AccessStore:
    """state_path: the dir of access.db; retention_days: rows not seen for
    this long are pruned; learning_period (seconds): after the store's
    creation, pairs first seen later call on_new_reader(pair, key).

    Thread use: add(), mounted() and tick() from the event loop only; the
    writer thread owns the connection."""

    def __init__(self, state_path: str, retention_days: int, learning_period: float, *,
                 node_name: str = "", on_new_reader: Callable[[tuple, tuple], None] | None = None,
                 clock: Callable[[], float] = time.time, max_pending: int = MAX_PENDING_ROWS,
                 max_objects: int = 10000):
        self.state_path = state_path
        self.path = db_path(state_path)
        self.retention_days = retention_days
        self.learning_period = learning_period
        self.node_name = node_name
        self.on_new_reader = on_new_reader
        # How many access groups the row keys folded (RowKeys.commands_folded), for the metric.
        self.commands_folded: Callable[[], int] = lambda: 0
        self.clock = clock
        self.max_pending = max_pending
        self.max_objects = max_objects
        self._pending: dict[tuple, list] = {}
        self._mounts: list[tuple] | None = None
        self._known: set[tuple] = set()
        self._loaded: set[tuple] | None = None   # pairs the writer read after a late open
        self.learning_until = clock() + learning_period
        # (namespace, kind, name) -> last access (wall seconds), and the
        # objects mounted now: the per-node gauges.
        self.last_access: dict[tuple, float] = {}
        self.mounted_objects: frozenset = frozenset()
        # Access key -> [accesses since start, cross_pod]: kernel_monitor_object_reads_total.
        self.totals: dict[tuple, list] = {}
        # Counted and exported: kernel_monitor_store_*.
        self.errors = dict.fromkeys(ERROR_OPERATIONS, 0)
        self.rows_dropped = 0     # loop thread
        self.retry_dropped = 0    # writer thread: rows a failing store could not keep
        self.rows_written = 0
        self.writes = 0
        self.up = False
        self.last_error: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._retry: dict[tuple, list] = {}     # writer-owned: rows a failed write kept
        self._retry_mounts: list[tuple] | None = None
        # The last inventory written (writer thread), and its time; None:
        # unknown (start, or a failed write), so the next one is written whole.
        self._written: set[tuple] | None = None
        self._written_at = 0.0
        self._last_prune = 0.0
        self._last_logged = -ERROR_LOG_SECONDS
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None

    # -- start and stop (loop thread) ----------------------------------------
    def open(self) -> bool:
        """Open the store now (at start-up, so history is there before the
        first event); on failure the writer keeps trying."""
        return self._open()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tapio-store", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop the writer."""
        if self._thread is not None:
            self._handoff(block=True, timeout=timeout)
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.error("access store writer stuck: %d rows not written", len(self._pending))
            self._thread.join(timeout)
            self._thread = None
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    # -- the hot path (loop thread) ------------------------------------------
    def add(self, key: tuple, cross_pod: bool, count: int, first: float, last: float) -> None:
        """Count `count` accesses of one access key, first and last at these
        wall-clock seconds."""
        row = self._pending.get(key)
        if row is not None:
            # The common case: one dict lookup. Totals and gauges follow at tick().
            row[0] += count
            if last > row[2]:
                row[2] = last
        elif len(self._pending) < self.max_pending:
            self._pending[key] = [count, first, last, cross_pod]
            pair = pair_of(key)
            if pair not in self._known:
                self._new_pair(pair, key, first)
        else:
            self.rows_dropped += 1

    def _new_pair(self, pair: tuple, key: tuple, when: float) -> None:
        if len(self._known) < MAX_KNOWN_PAIRS:
            self._known.add(pair)
        # The kubelet is no workload: its reads (atomic-writer updates) are the node's own.
        if when >= self.learning_until and self.on_new_reader is not None and pair[0] != "kubelet":
            try:
                self.on_new_reader(pair, key)
            except Exception:
                log.exception("new-reader alert")

    def mounted(self, rows: list[tuple]) -> None:
        """The mount inventory now: rows of MOUNT_KEY + MOUNT_NAMES values."""
        self._mounts = rows
        i_ns, i_kind, i_name = (len(MOUNT_KEY) + MOUNT_NAMES.index("namespace"),
                                MOUNT_KEY.index("object_kind"), MOUNT_KEY.index("object_name"))
        self.mounted_objects = frozenset((r[i_ns], r[i_kind], r[i_name]) for r in rows)

    def tick(self) -> None:
        """Hand what was gathered to the writer (at most once a second: the
        loop calls this from its periodic turn)."""
        if self._loaded is not None:
            self._known |= self._loaded
            self._loaded = None
        self._handoff(block=False)

    def _handoff(self, block: bool, timeout: float | None = None) -> None:
        if not self._pending and self._mounts is None:
            return
        if not block and self._queue.full():
            return  # the writer is still busy: keep gathering, rows merge in place
        batch = (self._pending, self._mounts, self.clock())
        self._fold(self._pending)
        # Only this thread puts: a queue not full now takes the batch.
        try:
            self._queue.put(batch, timeout=timeout)
        except queue.Full:
            log.error("access store writer stuck: %d rows not written", len(self._pending))
            self.rows_dropped += len(self._pending)
        self._pending, self._mounts = {}, None

    def _fold(self, rows: dict) -> None:
        """Rows handed to the writer count in the totals and the gauges (once)."""
        totals, last_access = self.totals, self.last_access
        for key, (count, _first, last, cross) in rows.items():
            total = totals.get(key)
            if total is not None:
                total[0] += count
            elif len(totals) < self.max_pending:
                totals[key] = [count, cross]
            obj = (key[OWNER_NS], key[OBJ_KIND], key[OBJ_NAME])
            seen = last_access.get(obj)
            if seen is None:
                if len(last_access) < self.max_objects:
                    last_access[obj] = last
            elif last > seen:
                last_access[obj] = last

    # -- the writer thread ---------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._write(*batch)
            except Exception:  # never let the writer die: the store would stop for good
                log.exception("access store writer")

    def _open(self) -> bool:
        try:
            conn = open_rw(self.state_path)
            now = self.clock()
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (repr(now),))
            if self.node_name:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('node_name', ?)", (self.node_name,))
            created = float(conn.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()[0])
            pairs = set(conn.execute(
                "SELECT DISTINCT accessor_kind, accessor_namespace, accessor_workload, "
                f"owner_namespace, object_kind, object_name FROM accesses LIMIT {MAX_KNOWN_PAIRS}"))
            last = conn.execute("SELECT owner_namespace, object_kind, object_name, max(last_seen) "
                                f"FROM accesses GROUP BY 1, 2, 3 LIMIT {self.max_objects}").fetchall()
        except (sqlite3.Error, OSError, StoreError, ValueError) as exc:
            self._failed("open", exc)
            return False
        self._conn = conn
        # Learning runs from the store's creation: a restart does not start it again.
        self.learning_until = created + self.learning_period
        if self._thread is None or threading.current_thread() is not self._thread:
            self._known |= pairs
            for ns, kind, name, seen in last:
                self.last_access.setdefault((ns, kind, name), seen)
        else:
            self._loaded = pairs
        self._recovered()
        return True

    def _write(self, rows: dict, mounts: list | None, now: float) -> None:
        if self._retry:
            rows = _merge(self._retry, rows, self.max_pending, self)
            self._retry = {}
        if mounts is None and self._retry_mounts is not None:
            mounts = self._retry_mounts
        self._retry_mounts = None
        if self._conn is None and not self._open():
            self._keep(rows, mounts)
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT_ACCESS, ((*k, int(v[3]), v[0], v[1], v[2]) for k, v in rows.items()))
                if mounts is not None:
                    self._write_mounts(conn, mounts, now)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self._written = None
            self._failed("write", exc)
            self._keep(rows, mounts)
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
                # Corrupt or not a database: reopen next time (and fail loudly again).
                self._drop_conn()
            return
        self.writes += 1
        self.rows_written += len(rows)
        self._recovered()
        if now - self._last_prune >= PRUNE_SECONDS:
            self.prune(now)

    def _write_mounts(self, conn: sqlite3.Connection, mounts: list, now: float) -> None:
        """Only the difference to the last inventory: rows of it still
        mounted all carry last_mounted == its time, so one indexed UPDATE
        moves them on; gone rows are put back, new ones inserted."""
        current = set(mounts)
        prev, prev_at = self._written, self._written_at
        if prev is None:
            new, gone = current, ()
        else:
            new, gone = current - prev, prev - current
            conn.execute("UPDATE mounts SET last_mounted = ? WHERE last_mounted = ?", (now, prev_at))
            conn.executemany(
                "UPDATE mounts SET last_mounted = ? WHERE " + " AND ".join(f"{c} = ?" for c in MOUNT_KEY),
                ((prev_at, *m[:len(MOUNT_KEY)]) for m in gone))
        conn.executemany(_UPSERT_MOUNT, ((*m, now, now) for m in new))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('inventory_at', ?)", (repr(now),))
        self._written, self._written_at = current, now

    def prune(self, now: float | None = None) -> int:
        """Delete rows not seen within retention_days; returns how many went."""
        now = self.clock() if now is None else now
        self._last_prune = now
        cutoff = now - self.retention_days * 86400.0
        try:
            with self._conn:
                n = self._conn.execute("DELETE FROM accesses WHERE last_seen < ?", (cutoff,)).rowcount
                n += self._conn.execute("DELETE FROM mounts WHERE last_mounted < ?", (cutoff,)).rowcount
        except (sqlite3.Error, OSError) as exc:
            self._failed("prune", exc)
            return 0
        if n:
            log.info("access store: pruned %d rows older than %d days", n, self.retention_days)
        return n

    def _keep(self, rows: dict, mounts: list | None) -> None:
        self._retry = _merge({}, rows, self.max_pending, self)
        self._retry_mounts = mounts

    def _drop_conn(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        self._conn = None

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors[operation] += 1
        self.up = False
        self.last_error = f"{operation}: {exc}"
        now = time.monotonic()
        if now - self._last_logged >= ERROR_LOG_SECONDS:
            self._last_logged = now
            log.error("access store %s failed (%s; %d errors so far); collection goes on, "
                      "reports will miss this data until it works again",
                      self.path, self.last_error, sum(self.errors.values()))

    def _recovered(self) -> None:
        if not self.up and self.last_error is not None:
            log.info("access store %s works again", self.path)
        self.up = True


def _merge(into: dict, rows: dict, cap: int, store: AccessStore) -> dict:
    for k, v in rows.items():
        have = into.get(k)
        if have is not None:
            have[0] += v[0]
            have[1] = min(have[1], v[1])
            have[2] = max(have[2], v[2])
            have[3] = have[3] or v[3]
        elif len(into) < cap:
            into[k] = v
        else:
            store.retry_dropped += 1
    return into
