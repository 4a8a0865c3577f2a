"""The embedded job store: one SQLite file (WAL mode) plus the blob folder.

Safe across threads (one connection per thread) and processes (every write transaction is
``BEGIN IMMEDIATE``, so two claimers serialize on SQLite's write lock and ``busy_timeout`` makes the
loser wait instead of failing). The statements are :class:`~service.jobs.sql.SqlStore`'s.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from service.jobs.sql import SCHEMA_VERSION, Db, SqlStore
from service.jobs.store import PerThread

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

#: How long a writer waits for another process's write lock before giving up (milliseconds).
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    idempotency_key TEXT UNIQUE,
    inputs TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    report_json TEXT,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    events INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS heartbeats (owner TEXT PRIMARY KEY, seen REAL NOT NULL);
"""


class SQLiteStore(SqlStore):
    """Jobs in one SQLite database file, blobs under ``artifacts/blobs``."""

    # NOW stays ":now", bound to the server's clock once per transaction; FOR_UPDATE and SKIP_LOCKED stay
    # empty: a write transaction holds the database's write lock from its start

    def __init__(self, path: Path, artifacts: Path) -> None:
        super().__init__(artifacts)
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"cannot open the job store {self.path}: its folder {self.path.parent} does not exist")
        self._conns = PerThread(self._connect, sqlite3.Connection.close, lambda conn: True)
        try:
            with self._transaction() as db:
                self._create_schema(db, _SCHEMA.split(";"), str(self.path))
        except sqlite3.Error as e:
            raise ValueError(f"cannot open the job store {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed transaction survives a power loss, not only a crash of the process
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _reader(self) -> Db:
        return Db(self._conns.get())

    @contextmanager
    def _transaction(self) -> Iterator[Db]:
        """A write transaction, holding SQLite's write lock from its start (no upgrade deadlocks)."""
        conn = self._conns.get()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # the clock read once the lock is held: one time per transaction, in commit order
            yield Db(conn, bound={"now": time.time()})
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _any(self, param: str) -> str:
        return f"IN (SELECT value FROM json_each(:{param}))"

    def _array(self, values: Iterable[str]) -> str:
        return json.dumps(list(values))

    def _greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})"

    def close(self) -> None:
        self._conns.close()
