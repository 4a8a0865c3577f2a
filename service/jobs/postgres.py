"""The job store for replicas: PostgreSQL (psycopg 3) plus a blob folder on a volume every replica mounts.

psycopg is an optional extra (``pip install 'onnx-pruner[postgres]'``), imported when a store is opened.
Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas claiming at once each get a different job
without waiting for one another; idempotent submits are decided by the unique constraint on
``idempotency_key`` (``INSERT ... ON CONFLICT DO NOTHING``). Timestamps come from the database's clock, so
replicas whose clocks disagree still judge heartbeats alike.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    redact_url,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

#: The schema this code reads and writes; recorded in the ``schema_version`` table.
SCHEMA_VERSION = 1

#: The advisory lock key that serializes schema creation between replicas opening at once ("onnxjobs").
_SCHEMA_LOCK = 0x6F6E6E786A6F6273

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS jobs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        idempotency_key TEXT UNIQUE,
        inputs TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        owner TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        report_json TEXT,
        result TEXT,
        error_code TEXT,
        error_message TEXT,
        events INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq)",
    """CREATE TABLE IF NOT EXISTS events (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (job_id, idx)
    )""",
    "CREATE TABLE IF NOT EXISTS heartbeats (owner TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL)",
]

_COLUMNS = (
    "id, state, created, updated, idempotency_key, inputs, attempts, owner, cancel_requested, "
    "report_json, result, error_code, error_message, events"
)
_NOW = "extract(epoch from now())::double precision"  # the transaction's start: one time per transaction
_HEARTBEAT = (
    f"INSERT INTO heartbeats (owner, seen) VALUES (%s, {_NOW}) ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen"
)


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


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise ValueError(
            "a postgresql:// job store needs the psycopg driver: pip install 'onnx-pruner[postgres]'"
        ) from e
    return psycopg


class PostgresStore(JobStore):
    """Jobs in a PostgreSQL database, blobs under ``artifacts/blobs`` (a volume shared by the replicas)."""

    def __init__(self, url: str, artifacts: Path) -> None:
        super().__init__(artifacts)
        self._psycopg = _import_psycopg()
        self.url = url
        # a lost connection (a restarted database) is replaced on the thread's next call
        self._conns: PerThread[psycopg.Connection[Any]] = PerThread(
            self._connect, lambda conn: conn.close(), lambda conn: not conn.closed and not conn.broken
        )
        try:
            with self._transaction() as db:
                # replicas opening a new database at once: one creates the tables, the others wait and find them
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    db.execute(statement)
                row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                assert row is not None
                if row[0] is None:
                    db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise ValueError(
                        f"the job store {redact_url(url)} has schema version {row[0]}, newer than this server's "
                        f"{SCHEMA_VERSION}: upgrade the server"
                    )
        except self._psycopg.Error as e:
            self.close()
            raise ValueError(f"cannot open the job store {redact_url(url)}: {e}") from e

    # ---------------------------------------------------------------------------------- connections

    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        return conn

    def _conn(self) -> psycopg.Connection[Any]:
        return self._conns.get()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._conn()
        with conn.transaction():
            yield conn

    def close(self) -> None:
        self._conns.close()

    # ------------------------------------------------------------------------------------------ jobs

    def submit(self, inputs: dict[str, str], idempotency_key: str | None = None) -> tuple[Job, bool]:
        while True:
            with self._transaction() as db:
                # the unique constraint on idempotency_key decides: a racing second insert does nothing
                row = db.execute(
                    "INSERT INTO jobs (id, state, created, updated, idempotency_key, inputs) "
                    f"VALUES (%s, %s, {_NOW}, {_NOW}, %s, %s) "
                    f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
                    (uuid.uuid4().hex, JobState.QUEUED.value, idempotency_key, json.dumps(inputs, sort_keys=True)),
                ).fetchone()
                if row is not None:
                    return _job(row), True
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = %s", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return _job(row), False
            # the job holding the key was deleted between the two statements: try again

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100, states: Collection[JobState] = ()) -> Jobs:
        sql = f"SELECT {_COLUMNS} FROM jobs"
        params: list[Any] = []
        if states:
            sql += " WHERE state = ANY(%s)"
            params.append([JobState(s).value for s in states])
        sql += " ORDER BY seq DESC LIMIT %s"
        params.append(limit)
        return [_job(row) for row in self._conn().execute(sql, params).fetchall()]

    def claim(self, owner: str) -> Job | None:
        with self._transaction() as db:
            db.execute(_HEARTBEAT, (owner,))
            # SKIP LOCKED: a job another replica is claiming right now is passed over, not waited for
            row = db.execute(
                "WITH next AS (SELECT seq FROM jobs WHERE state = %s ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                f"UPDATE jobs SET state = %s, owner = %s, attempts = attempts + 1, updated = {_NOW} "
                f"FROM next WHERE jobs.seq = next.seq RETURNING {_COLUMNS}",
                (JobState.QUEUED.value, JobState.RUNNING.value, owner),
            ).fetchone()
        return None if row is None else _job(row)

    def append_event(self, job_id: str, payload: bytes) -> int:
        with self._transaction() as db:
            # the row lock taken by this UPDATE orders concurrent appends to one job: indices are gap-free
            row = db.execute(
                "UPDATE jobs SET events = events + 1 WHERE id = %s RETURNING events - 1", (job_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            db.execute(
                "INSERT INTO events (job_id, idx, payload) VALUES (%s, %s, %s)", (job_id, row[0], bytes(payload))
            )
        return int(row[0])

    def events(self, job_id: str, start: int = 0, limit: int = 1000) -> Events:
        rows = self._conn().execute(
            "SELECT idx, payload FROM events WHERE job_id = %s AND idx >= %s ORDER BY idx LIMIT %s",
            (job_id, start, limit),
        )
        return [(int(idx), bytes(payload)) for idx, payload in rows.fetchall()]

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
        with self._transaction() as db:
            row = db.execute("SELECT state, owner FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            check_finishable(job_id, JobState(row[0]), row[1], owner)
            job = db.execute(
                f"UPDATE jobs SET state = %s, updated = {_NOW}, report_json = %s, result = %s, error_code = %s, "
                f"error_message = %s WHERE id = %s RETURNING {_COLUMNS}",
                (state.value, report_json, result, error_code, error_message, job_id),
            ).fetchone()
        assert job is not None
        return _job(job)

    def request_cancel(self, job_id: str) -> Job:
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            state = JobState(row[0])
            if state is JobState.QUEUED:
                db.execute(
                    f"UPDATE jobs SET state = %s, cancel_requested = TRUE, updated = {_NOW}, error_code = %s, "
                    "error_message = %s WHERE id = %s",
                    (JobState.CANCELLED.value, "CancelledError", "cancelled before it started", job_id),
                )
            elif state is JobState.RUNNING:
                db.execute(f"UPDATE jobs SET cancel_requested = TRUE, updated = {_NOW} WHERE id = %s", (job_id,))
            job = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert job is not None
        return _job(job)

    def heartbeat(self, owner: str) -> None:
        with self._transaction() as db:
            db.execute(_HEARTBEAT, (owner,))

    def recover(self, *, owner: str | None = None, dead_after: float = 60.0, max_attempts: int = 3) -> Jobs:
        changed: Jobs = []
        with self._transaction() as db:
            # dead: no sign of life (heartbeat, or the job's own last change) for dead_after seconds
            rows = db.execute(
                "SELECT j.id, j.owner, j.attempts, j.cancel_requested FROM jobs j "
                "LEFT JOIN heartbeats h ON h.owner = j.owner "
                f"WHERE j.state = %s AND (j.owner = %s OR greatest(h.seen, j.updated) < {_NOW} - %s) "
                "ORDER BY j.seq",
                (JobState.RUNNING.value, owner, dead_after),
            ).fetchall()
            for job_id, holder, attempts, cancel_requested in rows:
                state, code, message = recovered_state(attempts, bool(cancel_requested), max_attempts)
                # compare-and-set: a replica recovering at the same time, or the runner finishing, wins cleanly
                job = db.execute(
                    f"UPDATE jobs SET state = %s, owner = CASE WHEN %s = 'queued' THEN NULL ELSE owner END, "
                    f"updated = {_NOW}, error_code = %s, error_message = %s "
                    f"WHERE id = %s AND state = %s AND owner = %s AND attempts = %s RETURNING {_COLUMNS}",
                    (state.value, state.value, code, message, job_id, JobState.RUNNING.value, holder, attempts),
                ).fetchone()
                if job is not None:
                    changed.append(_job(job))
        return changed

    # --------------------------------------------------------------------------------------- cleanup

    def _now(self) -> float:
        row = self._conn().execute(f"SELECT {_NOW}").fetchone()
        assert row is not None
        return float(row[0])

    def _job_refs(self) -> JobRefs:
        rows = self._conn().execute("SELECT id, state, updated, inputs, result FROM jobs ORDER BY updated, seq")
        refs: JobRefs = []
        for job_id, state, updated, inputs, result in rows.fetchall():
            blobs = set(json.loads(inputs).values())
            if result is not None:
                blobs.add(result)
            refs.append((job_id, JobState(state), updated, blobs))
        return refs

    def _delete_finished(self, job_ids: Collection[str]) -> int:
        with self._transaction() as db:
            rows = db.execute(
                "DELETE FROM jobs WHERE id = ANY(%s) AND state = ANY(%s) RETURNING id",
                (list(job_ids), [s.value for s in FINISHED]),
            ).fetchall()
            deleted = [row[0] for row in rows]
            db.execute("DELETE FROM events WHERE job_id = ANY(%s)", (deleted,))
        return len(deleted)
