"""What the SQL job stores share: every statement, written once, and the logic around it.

:class:`SqlStore` holds the jobs' SQL for both backends (:mod:`service.jobs.sqlite`,
:mod:`service.jobs.postgres`); a backend keeps only what truly differs: its connections, its schema, its
transactions and a few dialect hooks. Statements name their parameters ``:name`` (SQLite's style, which
:func:`pyformat` turns into psycopg's ``%(name)s``) and put the hooks in with f-strings:

- :attr:`SqlStore.NOW`, the clock: SQLite binds ``:now`` to ``time.time()`` once per transaction;
  PostgreSQL reads the database's clock, so replicas whose clocks disagree judge heartbeats alike;
- :attr:`SqlStore.FOR_UPDATE` and :attr:`SqlStore.SKIP_LOCKED`, row locks (empty on SQLite, where a write
  transaction holds the whole database's write lock from its start);
- :meth:`SqlStore._any`, membership in an array parameter made by :meth:`SqlStore._array` (PostgreSQL's
  ``= ANY(array)``, SQLite's ``IN (SELECT value FROM json_each(json))``: no limit on the number of values);
- :meth:`SqlStore._greatest` (SQLite's two-argument ``max``).
"""

from __future__ import annotations

import abc
import functools
import json
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from service.jobs.store import (
    FINISHED,
    Events,
    Job,
    JobRefs,
    Jobs,
    JobState,
    JobStore,
    check_finishable,
    recovered_state,
)

__all__ = ["SCHEMA_VERSION", "Db", "SqlStore", "pyformat"]

#: The schema this code reads and writes; recorded in the ``schema_version`` table.
SCHEMA_VERSION = 1

_COLUMNS = (
    "id, state, created, updated, idempotency_key, inputs, attempts, owner, cancel_requested, "
    "report_json, result, error_code, error_message, events"
)

# a ``:name`` parameter, not the second colon of a ``::type`` cast
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=256)
def pyformat(sql: str) -> str:
    """``sql`` with its ``:name`` parameters written ``%(name)s`` (psycopg's style)."""
    return _NAMED.sub(r"%(\1)s", sql)


class Cursor(Protocol):
    """What a statement returns, on either driver."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db:
    """One connection running :class:`SqlStore`'s statements in the backend's dialect.

    Args:
        conn: a ``sqlite3`` or ``psycopg`` connection (each has ``execute(sql, params) -> cursor``).
        translate: turns a statement's ``:name`` parameters into the driver's style.
        bound: parameters bound to every statement (SQLite's ``now``).
    """

    def __init__(
        self, conn: Any, translate: Callable[[str], str] | None = None, bound: Mapping[str, Any] | None = None
    ) -> None:
        self._conn = conn
        self._translate = translate
        self._bound = dict(bound or {})

    def execute(self, sql: str, **params: Any) -> Cursor:
        """Runs one statement with named parameters."""
        if self._translate is not None:
            sql = self._translate(sql)
        cursor: Cursor = self._conn.execute(sql, {**self._bound, **params})
        return cursor


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


class SqlStore(JobStore):
    """The jobs of a :class:`JobStore` in an SQL database: the statements and the state machine, once."""

    #: The clock in SQL: unix seconds, one time per transaction.
    NOW: ClassVar[str] = ":now"
    #: Appended to a SELECT of a row the transaction then changes.
    FOR_UPDATE: ClassVar[str] = ""
    #: Appended to the claim's SELECT of the next queued job: a job being claimed elsewhere is passed over.
    SKIP_LOCKED: ClassVar[str] = ""

    # ------------------------------------------------------------------------------- backend hooks

    @abc.abstractmethod
    def _transaction(self) -> AbstractContextManager[Db]:
        """A write transaction on this thread's connection: committed on exit, rolled back on an exception."""

    @abc.abstractmethod
    def _reader(self) -> Db:
        """This thread's connection outside a transaction, for reads."""

    @abc.abstractmethod
    def _any(self, param: str) -> str:
        """SQL that is true when the value before it is in the array parameter ``param`` (see :meth:`_array`)."""

    @abc.abstractmethod
    def _array(self, values: Iterable[str]) -> Any:
        """The parameter value :meth:`_any` tests membership in."""

    def _create_schema(self, db: Db, statements: Iterable[str], where: str) -> None:
        """Creates the tables if missing and records the schema version; ValueError for a newer one."""
        for statement in statements:
            db.execute(statement)
        version = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if version is None:
            db.execute("INSERT INTO schema_version (version) VALUES (:version)", version=SCHEMA_VERSION)
        elif version > SCHEMA_VERSION:
            raise ValueError(
                f"the job store {where} has schema version {version}, newer than this server's "
                f"{SCHEMA_VERSION}: upgrade the server"
            )

    # ------------------------------------------------------------------------------------------ jobs

    def submit(self, inputs: dict[str, str], idempotency_key: str | None = None) -> tuple[Job, bool]:
        while True:
            with self._transaction() as db:
                # the unique constraint on idempotency_key decides: a racing second insert does nothing
                row = db.execute(
                    "INSERT INTO jobs (id, state, created, updated, idempotency_key, inputs) "
                    f"VALUES (:id, :state, {self.NOW}, {self.NOW}, :key, :inputs) "
                    f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
                    id=uuid.uuid4().hex,
                    state=JobState.QUEUED.value,
                    key=idempotency_key,
                    inputs=json.dumps(inputs, sort_keys=True),
                ).fetchone()
                if row is not None:
                    return _job(row), True
                row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = :key", key=idempotency_key)
                row = row.fetchone()
                if row is not None:
                    return _job(row), False
            # the job holding the key was deleted between the two statements (PostgreSQL): try again

    def get(self, job_id: str) -> Job | None:
        row = self._reader().execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = :id", id=job_id).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100, states: Collection[JobState] = ()) -> Jobs:
        where = f" WHERE state {self._any('states')}" if states else ""
        rows = self._reader().execute(
            f"SELECT {_COLUMNS} FROM jobs{where} ORDER BY seq DESC LIMIT :limit",
            states=self._array(JobState(s).value for s in states),
            limit=limit,
        )
        return [_job(row) for row in rows.fetchall()]

    def claim(self, owner: str) -> Job | None:
        with self._transaction() as db:
            self._heartbeat(db, owner)
            row = db.execute(
                "WITH next AS (SELECT seq FROM jobs WHERE state = :queued ORDER BY seq LIMIT 1"
                f"{self.SKIP_LOCKED}) "
                f"UPDATE jobs SET state = :running, owner = :owner, attempts = attempts + 1, updated = {self.NOW} "
                f"FROM next WHERE jobs.seq = next.seq RETURNING {_COLUMNS}",
                queued=JobState.QUEUED.value,
                running=JobState.RUNNING.value,
                owner=owner,
            ).fetchone()
        return None if row is None else _job(row)

    def append_event(self, job_id: str, payload: bytes) -> int:
        with self._transaction() as db:
            # the job's row, locked by this UPDATE, orders concurrent appends to one job: indices are gap-free
            row = db.execute("UPDATE jobs SET events = events + 1 WHERE id = :id RETURNING events - 1", id=job_id)
            row = row.fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            db.execute(
                "INSERT INTO events (job_id, idx, payload) VALUES (:id, :idx, :payload)",
                id=job_id,
                idx=row[0],
                payload=bytes(payload),
            )
        return int(row[0])

    def events(self, job_id: str, start: int = 0, limit: int = 1000) -> Events:
        rows = self._reader().execute(
            "SELECT idx, payload FROM events WHERE job_id = :id AND idx >= :start ORDER BY idx LIMIT :limit",
            id=job_id,
            start=start,
            limit=limit,
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
            row = db.execute(f"SELECT state, owner FROM jobs WHERE id = :id{self.FOR_UPDATE}", id=job_id).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            check_finishable(job_id, JobState(row[0]), row[1], owner)
            job = db.execute(
                f"UPDATE jobs SET state = :state, updated = {self.NOW}, report_json = :report_json, "
                "result = :result, error_code = :error_code, error_message = :error_message "
                f"WHERE id = :id RETURNING {_COLUMNS}",
                state=state.value,
                report_json=report_json,
                result=result,
                error_code=error_code,
                error_message=error_message,
                id=job_id,
            ).fetchone()
        return _job(job)

    def request_cancel(self, job_id: str) -> Job:
        with self._transaction() as db:
            row = db.execute(f"SELECT state FROM jobs WHERE id = :id{self.FOR_UPDATE}", id=job_id).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            state = JobState(row[0])
            if state is JobState.QUEUED:
                db.execute(
                    f"UPDATE jobs SET state = :state, cancel_requested = TRUE, updated = {self.NOW}, "
                    "error_code = :error_code, error_message = :error_message WHERE id = :id",
                    state=JobState.CANCELLED.value,
                    error_code="CancelledError",
                    error_message="cancelled before it started",
                    id=job_id,
                )
            elif state is JobState.RUNNING:
                db.execute(f"UPDATE jobs SET cancel_requested = TRUE, updated = {self.NOW} WHERE id = :id", id=job_id)
            job = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = :id", id=job_id).fetchone()
        return _job(job)

    def heartbeat(self, owner: str) -> None:
        with self._transaction() as db:
            self._heartbeat(db, owner)

    def _heartbeat(self, db: Db, owner: str) -> None:
        db.execute(
            f"INSERT INTO heartbeats (owner, seen) VALUES (:owner, {self.NOW}) "
            "ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen",
            owner=owner,
        )

    def recover(self, *, owner: str | None = None, dead_after: float = 60.0, max_attempts: int = 3) -> Jobs:
        changed: Jobs = []
        with self._transaction() as db:
            # dead: no sign of life (heartbeat, or the job's own last change) for dead_after seconds; the
            # two-argument max is SQLite's greatest, and is NULL if one is, hence the coalesce
            rows = db.execute(
                "SELECT j.id, j.owner, j.attempts, j.cancel_requested FROM jobs j "
                "LEFT JOIN heartbeats h ON h.owner = j.owner "
                f"WHERE j.state = :running AND (j.owner = :owner OR "
                f"{self._greatest('coalesce(h.seen, j.updated)', 'j.updated')} < {self.NOW} - :dead_after) "
                "ORDER BY j.seq",
                running=JobState.RUNNING.value,
                owner=owner,
                dead_after=dead_after,
            ).fetchall()
            for job_id, holder, attempts, cancel_requested in rows:
                state, code, message = recovered_state(attempts, bool(cancel_requested), max_attempts)
                # compare-and-set: a replica recovering at the same time, or the runner finishing, wins cleanly
                job = db.execute(
                    "UPDATE jobs SET state = :state, owner = CASE WHEN :state = 'queued' THEN NULL ELSE owner END, "
                    f"updated = {self.NOW}, error_code = :error_code, error_message = :error_message "
                    "WHERE id = :id AND state = :running AND owner = :holder AND attempts = :attempts "
                    f"RETURNING {_COLUMNS}",
                    state=state.value,
                    error_code=code,
                    error_message=message,
                    id=job_id,
                    running=JobState.RUNNING.value,
                    holder=holder,
                    attempts=attempts,
                ).fetchone()
                if job is not None:
                    changed.append(_job(job))
        return changed

    def _greatest(self, a: str, b: str) -> str:
        """SQL for the greater of two values."""
        return f"greatest({a}, {b})"

    # --------------------------------------------------------------------------------------- cleanup

    def _job_refs(self) -> JobRefs:
        rows = self._reader().execute("SELECT id, state, updated, inputs, result FROM jobs ORDER BY updated, seq")
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
                f"DELETE FROM jobs WHERE id {self._any('ids')} AND state {self._any('finished')} RETURNING id",
                ids=self._array(job_ids),
                finished=self._array(s.value for s in FINISHED),
            ).fetchall()
            deleted = [row[0] for row in rows]
            db.execute(f"DELETE FROM events WHERE job_id {self._any('ids')}", ids=self._array(deleted))
        return len(deleted)
