"""The access store's SQLite schema, its version and its migrations.

`PRAGMA user_version` holds the schema version; MIGRATIONS[i] takes a
database from version i to i + 1, so a store written by any earlier
release is brought up to date in place, and one written by a newer
release is refused (never rewritten)."""
from __future__ import annotations

import os
import sqlite3

DB_NAME = "access.db"

# The columns that make an access row one row (the aggregation key), in
# the order AccessKey tuples carry them. '' stands for "unknown": SQLite
# treats NULLs as distinct in a UNIQUE index, so they would never merge.
ACCESS_KEY = ("owner_namespace", "owner_pod", "owner_uid", "owner_workload",
              "volume_kind", "object_kind", "object_name", "volume_name", "key",
              "accessor_kind", "accessor_namespace", "accessor_workload", "accessor_pod",
              "accessor_container", "host_cgroup", "command")
MOUNT_KEY = ("pod_uid", "volume_name", "key", "object_kind", "object_name")
MOUNT_NAMES = ("namespace", "pod", "workload", "volume_kind")

_V1 = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accesses (
  {", ".join(f"{c} TEXT NOT NULL" for c in ACCESS_KEY)},
  cross_pod INTEGER NOT NULL DEFAULT 0,
  count INTEGER NOT NULL,
  first_seen REAL NOT NULL,
  last_seen REAL NOT NULL
);
CREATE UNIQUE INDEX accesses_key ON accesses ({", ".join(ACCESS_KEY)});
CREATE INDEX accesses_object ON accesses (owner_namespace, object_name);
CREATE INDEX accesses_last ON accesses (last_seen);
CREATE TABLE mounts (
  namespace TEXT NOT NULL, pod TEXT NOT NULL, pod_uid TEXT NOT NULL, workload TEXT NOT NULL,
  volume_kind TEXT NOT NULL, object_kind TEXT NOT NULL, object_name TEXT NOT NULL,
  volume_name TEXT NOT NULL, key TEXT NOT NULL,
  first_mounted REAL NOT NULL,
  last_mounted REAL NOT NULL
);
CREATE UNIQUE INDEX mounts_key ON mounts ({", ".join(MOUNT_KEY)});
CREATE INDEX mounts_last ON mounts (last_mounted);
"""

# Version i -> i + 1. Append, never edit a released step.
MIGRATIONS: tuple[str, ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used; the message says why and what to do."""


def db_path(state_path: str) -> str:
    return os.path.join(state_path, DB_NAME)


def open_rw(state_path: str) -> sqlite3.Connection:
    """Open (creating it and state_path if needed) and migrate the store."""
    os.makedirs(state_path, mode=0o700, exist_ok=True)
    conn = sqlite3.connect(db_path(state_path), timeout=2.0, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL with NORMAL loses at most the last commits on power loss, never
        # consistency; FULL would fsync on every batch.
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION; returns the version found."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StoreError(f"the store has schema version {found}, newer than this tapio-node's "
                         f"{SCHEMA_VERSION}: it was written by a newer release (upgrade, or move "
                         "the file away to start a new store)")
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(MIGRATIONS[version]):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def open_ro(state_path: str) -> sqlite3.Connection:
    """Open the store read-only, for `tapio-node report` (the daemon may be
    writing it: WAL lets both go on)."""
    path = db_path(state_path)
    if os.path.isdir(state_path) and not os.access(state_path, os.R_OK | os.X_OK):
        raise StoreError(f"cannot read {state_path}: permission denied (the daemon keeps it "
                         "root-only: run the report as root, e.g. with sudo)")
    if not os.path.exists(path):
        raise StoreError(f"no access store at {path}: the daemon has not run with "
                         "state_path set to this dir yet (see state_path in tapio-node(8))")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError:
        # A WAL database opened read-only needs its -shm file; without a
        # running daemon there may be none and the dir may not be ours to
        # write. Nobody writes then, so reading it as immutable is safe.
        try:
            conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {path}: {exc}")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read {path}: {exc} (is it a tapio-node store?)")
    if version == 0:
        raise StoreError(f"{path} has no tapio-node schema yet (the daemon is creating it?)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, newer than this tapio-node's "
                         f"{SCHEMA_VERSION}: use the tapio-node that wrote it")
    return conn
