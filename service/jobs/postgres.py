"""The job store for replicas: PostgreSQL (psycopg 3) plus a blob folder on a volume every replica mounts.

psycopg is an optional extra (``pip install 'onnx-pruner[postgres]'``), imported when a store is opened.
Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas claiming at once each get a different job
without waiting for one another; idempotent submits are decided by the unique constraint on
``idempotency_key`` (``INSERT ... ON CONFLICT DO NOTHING``). Timestamps come from the database's clock, so
replicas whose clocks disagree still judge heartbeats alike. The statements are
:class:`~service.jobs.sql.SqlStore`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.jobs.sql import SCHEMA_VERSION, Db, SqlStore, pyformat
from service.jobs.store import PerThread, redact_url

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

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


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise ValueError(
            "a postgresql:// job store needs the psycopg driver: pip install 'onnx-pruner[postgres]'"
        ) from e
    return psycopg


class PostgresStore(SqlStore):
    """Jobs in a PostgreSQL database, blobs under ``artifacts/blobs`` (a volume shared by the replicas)."""

    # the transaction's start: one time per transaction
    NOW = "extract(epoch from now())::double precision"
    FOR_UPDATE = " FOR UPDATE"
    # a job another replica is claiming right now is passed over, not waited for
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

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
                db.execute("SELECT pg_advisory_xact_lock(:key)", key=_SCHEMA_LOCK)
                self._create_schema(db, _SCHEMA, redact_url(url))
        except self._psycopg.Error as e:
            self.close()
            raise ValueError(f"cannot open the job store {redact_url(url)}: {e}") from e

    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        return conn

    def _reader(self) -> Db:
        return Db(self._conns.get(), pyformat)

    @contextmanager
    def _transaction(self) -> Iterator[Db]:
        conn = self._conns.get()
        with conn.transaction():
            yield Db(conn, pyformat)

    def _any(self, param: str) -> str:
        return f"= ANY(:{param})"

    def _array(self, values: Iterable[str]) -> list[str]:
        return list(values)

    def _now(self) -> float:
        row = self._reader().execute(f"SELECT {self.NOW}").fetchone()
        return float(row[0])

    def close(self) -> None:
        self._conns.close()
