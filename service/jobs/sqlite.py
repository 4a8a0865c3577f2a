"""The embedded job store: one SQLite file (WAL mode) plus the blob folder.

Safe across threads (one connection per thread) and processes (every write transaction is
``BEGIN IMMEDIATE``, so two claimers serialize on SQLite's write lock and ``busy_timeout`` makes the
loser wait instead of failing).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.jobs.store import (
    FINISHED,
    Events,
    Job,
    JobRefs,
    Jobs,
    JobState,
    JobStore,
    PerThread,
    check_finishable,
    recovered_state,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

#: The schema this code reads and writes; recorded in the ``schema_version`` table.
SCHEMA_VERSION = 1

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

_COLUMNS = (
    "id, state, created, updated, idempotency_key, inputs, attempts, owner, cancel_requested, "
    "report_json, result, error_code, error_message, events"
)

_HEARTBEAT = "INSERT INTO heartbeats (owner, seen) VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen"


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        id=row[0],
        state=JobState(row[1]),
        created=row[2],
        updated=row[3],
        idempotency_key=row[4],
        inputs=json.loads(row[5]),
        attempts=row[6],
        owner=row[7],
        cancel_requested=bool(row[8]),
        report_json=row[9],
        result=row[10],
        error_code=row[11],
        error_message=row[12],
        events=row[13],
    )


class SQLiteStore(JobStore):
    """Jobs in one SQLite database file, blobs under ``artifacts/blobs``."""

    def __init__(self, path: Path, artifacts: Path) -> None:
        super().__init__(artifacts)
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"cannot open the job store {self.path}: its folder {self.path.parent} does not exist")
        self._conns = PerThread(self._connect, sqlite3.Connection.close, lambda conn: True)
        try:
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    db.execute(statement)
                row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                if row[0] is None:
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise ValueError(
                        f"the job store {self.path} has schema version {row[0]}, newer than this server's "
                        f"{SCHEMA_VERSION}: upgrade the server"
                    )
        except sqlite3.Error as e:
            raise ValueError(f"cannot open the job store {self.path}: {e}") from e

    # ---------------------------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed transaction survives a power loss, not only a crash of the process
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        return self._conns.get()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding SQLite's write lock from its start (no upgrade deadlocks)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self._conns.close()

    # ------------------------------------------------------------------------------------------ jobs

    def submit(self, inputs: dict[str, str], idempotency_key: str | None = None) -> tuple[Job, bool]:
        now = time.time()
        with self._write() as db:
            # the unique constraint on idempotency_key decides: a second submit with the key inserts nothing
            row = db.execute(
                "INSERT INTO jobs (id, state, created, updated, idempotency_key, inputs) VALUES (?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
                (
                    uuid.uuid4().hex,
                    JobState.QUEUED.value,
                    now,
                    now,
                    idempotency_key,
                    json.dumps(inputs, sort_keys=True),
                ),
            ).fetchone()
            if row is not None:
                return _job(row), True
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return _job(row), False

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100, states: Collection[JobState] = ()) -> Jobs:
        sql = f"SELECT {_COLUMNS} FROM jobs"
        params: list[Any] = []
        if states:
            sql += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params += [JobState(s).value for s in states]
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [_job(row) for row in self._conn().execute(sql, params)]

    def claim(self, owner: str) -> Job | None:
        now = time.time()
        with self._write() as db:
            db.execute(_HEARTBEAT, (owner, now))
            row = db.execute(
                "SELECT seq FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (JobState.QUEUED.value,)
            ).fetchone()
            if row is None:
                return None
            job = db.execute(
                f"UPDATE jobs SET state = ?, owner = ?, attempts = attempts + 1, updated = ? WHERE seq = ? "
                f"RETURNING {_COLUMNS}",
                (JobState.RUNNING.value, owner, now, row[0]),
            ).fetchone()
        return _job(job)

    def append_event(self, job_id: str, payload: bytes) -> int:
        with self._write() as db:
            row = db.execute(
                "UPDATE jobs SET events = events + 1 WHERE id = ? RETURNING events - 1", (job_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            db.execute("INSERT INTO events (job_id, idx, payload) VALUES (?, ?, ?)", (job_id, row[0], bytes(payload)))
        return int(row[0])

    def events(self, job_id: str, start: int = 0, limit: int = 1000) -> Events:
        rows = self._conn().execute(
            "SELECT idx, payload FROM events WHERE job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (job_id, start, limit),
        )
        return [(int(idx), bytes(payload)) for idx, payload in rows]

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        report_json: str | None = None,
        result: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        owner: str | None = None,
    ) -> Job:
        state = JobState(state)
        if state not in FINISHED:
            raise ValueError(
                f"cannot finish a job as {state.value}: a finished state is one of succeeded, failed, cancelled"
            )
        with self._write() as db:
            row = db.execute("SELECT state, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            check_finishable(job_id, JobState(row[0]), row[1], owner)
            job = db.execute(
                "UPDATE jobs SET state = ?, updated = ?, report_json = ?, result = ?, error_code = ?, "
                f"error_message = ? WHERE id = ? RETURNING {_COLUMNS}",
                (state.value, time.time(), report_json, result, error_code, error_message, job_id),
            ).fetchone()
        return _job(job)

    def request_cancel(self, job_id: str) -> Job:
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            state = JobState(row[0])
            if state is JobState.QUEUED:
                db.execute(
                    "UPDATE jobs SET state = ?, cancel_requested = 1, updated = ?, error_code = ?, error_message = ? "
                    "WHERE id = ?",
                    (JobState.CANCELLED.value, now, "CancelledError", "cancelled before it started", job_id),
                )
            elif state is JobState.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id))
            job = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(job)

    def heartbeat(self, owner: str) -> None:
        with self._write() as db:
            db.execute(_HEARTBEAT, (owner, time.time()))

    def recover(self, *, owner: str | None = None, dead_after: float = 60.0, max_attempts: int = 3) -> Jobs:
        now = time.time()
        changed: Jobs = []
        with self._write() as db:
            # dead: no sign of life (heartbeat, or the job's own last change) for dead_after seconds
            rows = db.execute(
                "SELECT j.id, j.attempts, j.cancel_requested FROM jobs j "
                "LEFT JOIN heartbeats h ON h.owner = j.owner "
                "WHERE j.state = ? AND (j.owner = ? OR max(coalesce(h.seen, j.updated), j.updated) < ?) "
                "ORDER BY j.seq",
                (JobState.RUNNING.value, owner, now - dead_after),
            ).fetchall()
            for job_id, attempts, cancel_requested in rows:
                state, code, message = recovered_state(attempts, bool(cancel_requested), max_attempts)
                job = db.execute(
                    "UPDATE jobs SET state = ?, owner = CASE WHEN ? = 'queued' THEN NULL ELSE owner END, "
                    f"updated = ?, error_code = ?, error_message = ? WHERE id = ? RETURNING {_COLUMNS}",
                    (state.value, state.value, now, code, message, job_id),
                ).fetchone()
                changed.append(_job(job))
        return changed

    # --------------------------------------------------------------------------------------- cleanup

    def _job_refs(self) -> JobRefs:
        rows = self._conn().execute("SELECT id, state, updated, inputs, result FROM jobs ORDER BY updated, seq")
        return [
            (job_id, JobState(state), updated, _refs(inputs, result)) for job_id, state, updated, inputs, result in rows
        ]

    def _delete_finished(self, job_ids: Collection[str]) -> int:
        finished = [s.value for s in FINISHED]
        deleted = 0
        with self._write() as db:
            for job_id in job_ids:
                cur = db.execute(
                    f"DELETE FROM jobs WHERE id = ? AND state IN ({', '.join('?' * len(finished))})",
                    (job_id, *finished),
                )
                if cur.rowcount:
                    db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                    deleted += 1
        return deleted


def _refs(inputs: str, result: str | None) -> set[str]:
    refs = set(json.loads(inputs).values())
    if result is not None:
        refs.add(result)
    return refs
