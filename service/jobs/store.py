"""The job store: jobs, their events and their blobs, durable across restarts and shared by replicas.

A job's row (state, inputs, report, error) and its progress events live in a database: SQLite for one
server (:mod:`service.jobs.sqlite`, the default) or PostgreSQL for replicas (:mod:`service.jobs.postgres`).
Its input and output files live beside it as content-addressed blobs under ``<artifacts>/blobs``; the
rows refer to them by sha256. :func:`open_store` picks the backend from a URL.

State machine::

    QUEUED --claim--> RUNNING --finish--> SUCCEEDED | FAILED | CANCELLED
    QUEUED --request_cancel--> CANCELLED
    RUNNING --recover (owner dead)--> QUEUED, or FAILED ("JobCrashedError") after max_attempts claims

``docs/jobs-store.md`` describes the schema, recovery and retention.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BLOB_GRACE",
    "FINISHED",
    "CleanupStats",
    "Job",
    "JobState",
    "JobStore",
    "open_store",
]

#: Unreferenced blobs (and leftover temp files) younger than this are kept by cleanup: an upload stores its
#: blobs before it submits the job that refers to them.
DEFAULT_BLOB_GRACE = 3600.0

_DIGEST = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = "tmp-"


class JobState(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The states a job never leaves.
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclasses.dataclass(frozen=True)
class Job:
    """One job as stored.

    Attributes:
        id: uuid4 hex.
        state: where it is.
        created: unix seconds of the submit.
        updated: unix seconds of the last change of state (or cancel request).
        idempotency_key: the key it was submitted with, if any.
        inputs: name -> blob sha256 ("model", "eval", "config", ...).
        attempts: how many times a runner claimed it.
        owner: the replica that claimed it last.
        cancel_requested: a cancel was asked for while it ran.
        report_json: the pruner's JSON report, if any.
        result: blob sha256 of the pruned model once SUCCEEDED.
        error_code: the error table's class name (``service/errors.py``), e.g. ``"JobCrashedError"``.
        error_message: what went wrong.
        events: the number of events appended so far.
    """

    id: str
    state: JobState
    created: float
    updated: float
    idempotency_key: str | None
    inputs: dict[str, str]
    attempts: int
    owner: str | None
    cancel_requested: bool
    report_json: str | None
    result: str | None
    error_code: str | None
    error_message: str | None
    events: int

    def blobs(self) -> set[str]:
        """The digests of every blob this job refers to (inputs and result)."""
        refs = set(self.inputs.values())
        if self.result is not None:
            refs.add(self.result)
        return refs


@dataclasses.dataclass(frozen=True)
class CleanupStats:
    """What one :meth:`JobStore.cleanup` removed and what is left."""

    jobs_deleted: int = 0
    blobs_deleted: int = 0
    bytes_freed: int = 0
    bytes_left: int = 0


#: What :meth:`JobStore.list` and :meth:`JobStore.recover` return (``list`` is a method name inside the class).
Jobs = list[Job]
#: What :meth:`JobStore.events` returns: (index, payload) pairs.
Events = list[tuple[int, bytes]]
#: (id, state, updated, blobs) of jobs, for cleanup.
JobRefs = list[tuple[str, JobState, float, set[str]]]


C = TypeVar("C")


class PerThread(Generic[C]):
    """One database connection per thread and per process, for a store used from many threads.

    A forked child gets connections of its own (a connection must not cross a fork) and never closes its
    parent's; the connections of threads that ended are closed when the next one is opened, so a server
    that starts a thread per job does not pile them up.
    """

    def __init__(self, connect: Callable[[], C], close: Callable[[C], None], usable: Callable[[C], bool]) -> None:
        self._connect = connect
        self._close = close
        self._usable = usable
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[int, threading.Thread, C]] = []
        self._closed = False

    def get(self) -> C:
        """This thread's connection, opened if it has none (or lost it)."""
        if self._closed:
            raise RuntimeError("the job store is closed")
        pid = os.getpid()
        held: tuple[int, C] | None = getattr(self._local, "conn", None)
        if held is not None and held[0] == pid and self._usable(held[1]):
            return held[1]
        conn = self._connect()
        self._local.conn = (pid, conn)
        me = threading.current_thread()
        with self._lock:
            stale = [e for e in self._open if e[0] == pid and (not e[1].is_alive() or e[1] is me)]
            self._open = [e for e in self._open if e not in stale] + [(pid, me, conn)]
        for _, _, old in stale:
            self._close(old)
        return conn

    def close(self) -> None:
        """Closes every connection this process opened; later calls to :meth:`get` raise RuntimeError."""
        with self._lock:
            self._closed = True
            entries, self._open = self._open, []
        pid = os.getpid()
        for owner_pid, _, conn in entries:
            # a connection inherited through a fork is the parent's: closing it here would break it there
            if owner_pid == pid:
                self._close(conn)


def crashed_message(attempts: int) -> str:
    """The error message of a job failed by :meth:`JobStore.recover`."""
    plural = "attempt" if attempts == 1 else "attempts"
    return (
        f"the job's runner died {attempts} times ({attempts} {plural}, the limit); "
        "the job is not retried again (its replica crashed, was killed, or stopped sending heartbeats)"
    )


def check_finishable(job_id: str, state: JobState, holder: str | None, owner: str | None) -> None:
    """Raises ValueError unless a job in ``state`` held by ``holder`` may be finished (by ``owner``, if given)."""
    if state in FINISHED:
        raise ValueError(f"job {job_id} is already {state.value}: a finished job is never overwritten")
    if owner is not None and (state is not JobState.RUNNING or holder != owner):
        raise ValueError(
            f"job {job_id} is no longer {owner}'s running job (it is {state.value}, owner {holder}): "
            "it was recovered after its runner was taken for dead"
        )


def recovered_state(
    attempts: int, cancel_requested: bool, max_attempts: int
) -> tuple[JobState, str | None, str | None]:
    """The state a recovered RUNNING job goes to, with its error code and message."""
    if cancel_requested:
        return JobState.CANCELLED, "CancelledError", "cancelled (its runner died before it stopped)"
    if attempts >= max_attempts:
        return JobState.FAILED, "JobCrashedError", crashed_message(attempts)
    return JobState.QUEUED, None, None


class JobStore(abc.ABC):
    """Jobs, their events and their blobs. Safe to use from several threads and processes at once."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = Path(artifacts)
        self._blobs = self.artifacts / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------- blobs

    def put_blob(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Stores the concatenated chunks; returns (sha256 hex, size).

        Written to a temp file beside the blobs, fsync'd, then renamed into place, so a blob is never
        half-written: a failing iterator leaves no file. Equal content is stored once.
        """
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self._blobs)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            hexdigest = digest.hexdigest()
            final = self._blob_file(hexdigest)
            final.parent.mkdir(exist_ok=True)
            try:
                # stored already: a fresh mtime keeps it out of cleanup's reach until the job refers to it
                os.utime(final)
                tmp.unlink()
            except FileNotFoundError:
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            return hexdigest, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def blob_path(self, digest: str) -> Path:
        """The file of a stored blob. KeyError if there is none."""
        if not _DIGEST.fullmatch(digest):
            raise KeyError(f"{digest!r} is not a sha256 hex digest")
        path = self._blob_file(digest)
        if not path.is_file():
            raise KeyError(f"no blob {digest}")
        return path

    def _blob_file(self, digest: str) -> Path:
        return self._blobs / digest[:2] / digest

    def _blob_files(self) -> Iterator[Path]:
        for sub in self._blobs.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from (p for p in sub.iterdir() if _DIGEST.fullmatch(p.name))

    # ------------------------------------------------------------------------------------------ jobs

    @abc.abstractmethod
    def submit(self, inputs: dict[str, str], idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Adds a QUEUED job; returns (job, created).

        The same idempotency key again returns the existing job with created=False, across replicas too
        (a unique constraint decides).
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is none with that id."""

    @abc.abstractmethod
    def list(self, limit: int = 100, states: Collection[JobState] = ()) -> Jobs:
        """Up to ``limit`` jobs, newest first, only those in ``states`` if given."""

    @abc.abstractmethod
    def claim(self, owner: str) -> Job | None:
        """Atomically moves the oldest QUEUED job to RUNNING for ``owner`` (attempts + 1). None if none is queued.

        Also counts as a heartbeat of ``owner``.
        """

    @abc.abstractmethod
    def append_event(self, job_id: str, payload: bytes) -> int:
        """Appends an event; returns its index (0-based, gap-free). KeyError for an unknown id."""

    @abc.abstractmethod
    def events(self, job_id: str, start: int = 0, limit: int = 1000) -> Events:
        """Up to ``limit`` events from index ``start``, in order."""

    @abc.abstractmethod
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
        """Moves a RUNNING (or QUEUED) job to a FINISHED state.

        ValueError if it is already finished (never overwrites), if ``state`` is not a finished state, or if
        ``owner`` is given and the job is no longer that owner's RUNNING job (it was recovered meanwhile).
        KeyError for an unknown id.
        """

    @abc.abstractmethod
    def request_cancel(self, job_id: str) -> Job:
        """QUEUED -> CANCELLED at once; RUNNING -> cancel_requested; finished: unchanged. KeyError if unknown."""

    @abc.abstractmethod
    def heartbeat(self, owner: str) -> None:
        """Records that replica ``owner`` is alive now."""

    @abc.abstractmethod
    def recover(self, *, owner: str | None = None, dead_after: float = 60.0, max_attempts: int = 3) -> Jobs:
        """Requeues (or fails) the RUNNING jobs of ``owner`` and of replicas silent for ``dead_after`` seconds.

        A job whose attempts reached ``max_attempts`` is FAILED with error_code "JobCrashedError"; a job whose
        cancel was requested is CANCELLED. Returns the jobs it changed, as they are now.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Closes the store's connections (those of every thread)."""

    # --------------------------------------------------------------------------------------- cleanup

    @abc.abstractmethod
    def _job_refs(self) -> JobRefs:
        """(id, state, updated, blobs) of every job, least recently updated first."""

    @abc.abstractmethod
    def _delete_finished(self, job_ids: Collection[str]) -> int:
        """Deletes these jobs and their events if FINISHED; returns how many it deleted."""

    def cleanup(
        self, *, ttl: float | None = None, max_bytes: int | None = None, grace: float = DEFAULT_BLOB_GRACE
    ) -> CleanupStats:
        """Applies the retention rules.

        Deletes FINISHED jobs updated more than ``ttl`` seconds ago (with their events), then the least
        recently updated FINISHED jobs until the blobs the remaining jobs refer to total at most ``max_bytes``,
        then every blob no remaining job refers to (and leftover temp files) older than ``grace`` seconds.
        QUEUED and RUNNING jobs and their blobs are never touched.
        """
        now = self._now()
        jobs = self._job_refs()
        refcount: dict[str, int] = {}
        for _, _, _, refs in jobs:
            for digest in refs:
                refcount[digest] = refcount.get(digest, 0) + 1
        finished = [(job_id, updated, refs) for job_id, state, updated, refs in jobs if state in FINISHED]
        doomed: list[str] = []
        kept: list[tuple[str, set[str]]] = []
        for job_id, updated, refs in finished:
            if ttl is not None and updated < now - ttl:
                doomed.append(job_id)
                for digest in refs:
                    refcount[digest] -= 1
            else:
                kept.append((job_id, refs))
        if max_bytes is not None:
            sizes = {digest: _size(self._blob_file(digest)) for digest in refcount}
            total = sum(sizes[digest] for digest, n in refcount.items() if n > 0)
            for job_id, refs in kept:
                if total <= max_bytes:
                    break
                doomed.append(job_id)
                for digest in refs:
                    refcount[digest] -= 1
                    if refcount[digest] == 0:
                        total -= sizes[digest]
        jobs_deleted = self._delete_finished(doomed) if doomed else 0

        # blobs: referenced set taken after the deletes, and only blobs older than the grace period go, so a
        # blob just stored (or stored again) for a job being submitted right now stays
        referenced = {digest for _, _, _, refs in self._job_refs() for digest in refs}
        blobs_deleted = 0
        bytes_freed = 0
        bytes_left = 0
        for path in list(self._blob_files()):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.name in referenced or stat.st_mtime > time.time() - grace:
                bytes_left += stat.st_size
                continue
            path.unlink(missing_ok=True)
            blobs_deleted += 1
            bytes_freed += stat.st_size
        for tmp in self._blobs.glob(_TMP_PREFIX + "*"):
            try:
                if tmp.stat().st_mtime < time.time() - grace:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        stats = CleanupStats(jobs_deleted, blobs_deleted, bytes_freed, bytes_left)
        if jobs_deleted or blobs_deleted:
            logger.info("cleanup: %s", stats)
        return stats

    def _now(self) -> float:
        """The clock the store's timestamps come from (unix seconds)."""
        return time.time()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(url: str, artifacts: Path) -> JobStore:
    """Opens (and creates, if new) the job store at ``url``, with its blobs under ``artifacts``.

    ``sqlite:///abs/path/jobs.db`` is the embedded default; ``postgresql://user@host:port/db`` is for
    replicas (with ``artifacts`` on a volume they all mount). ValueError for an unknown scheme or a database
    that cannot be opened.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "sqlite":
        from service.jobs.sqlite import SQLiteStore

        path = url[len("sqlite://") :]
        if not path or path == "/":
            raise ValueError(f"job store URL {url!r} names no database file: use sqlite:///abs/path/jobs.db")
        return SQLiteStore(Path(path), artifacts)
    if scheme in ("postgresql", "postgres"):
        from service.jobs.postgres import PostgresStore

        return PostgresStore(url, artifacts)
    raise ValueError(
        f"job store URL {redact_url(url)!r} has an unknown scheme {scheme!r}: "
        "use sqlite:///abs/path/jobs.db or postgresql://user@host:port/db"
    )


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
