"""The job store's contract, on every backend (SQLite, and a real PostgreSQL server the tests start)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.jobs.store import FINISHED, Job, JobState, JobStore, open_store

OpenStore = Callable[[], JobStore]
ROOT = Path(__file__).resolve().parents[3]

# a child process: opens the store, waits for the go file, then claims (or submits) and prints JSON lines
CHILD = r"""
import json, sys, time
from pathlib import Path
from service.jobs.store import open_store
url, artifacts, go, mode, arg = sys.argv[1:6]
store = open_store(url, Path(artifacts))
while not Path(go).exists():
    time.sleep(0.005)
if mode == "claim":
    while (job := store.claim(arg)) is not None:
        print(json.dumps({"id": job.id, "attempts": job.attempts}), flush=True)
elif mode == "submit":
    job, created = store.submit({"model": "0" * 64}, idempotency_key=arg)
    print(json.dumps({"id": job.id, "created": created}), flush=True)
store.close()
"""


def run_children(
    url: str, artifacts: Path, tmp_path: Path, mode: str, args: list[str]
) -> list[list[dict[str, object]]]:
    """Runs one child per arg, all released at once; returns each child's JSON lines."""
    go = tmp_path / f"go-{mode}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(artifacts), str(go), mode, arg],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for arg in args
    ]
    time.sleep(0.5)  # let them open the store; a slow one only joins the race later
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results.append([json.loads(line) for line in out.splitlines()])
    return results


def run_threads(n: int, target: Callable[[int], None]) -> None:
    """Runs target(i) in n threads released together; re-raises the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def inputs(store: JobStore, tag: bytes = b"model") -> dict[str, str]:
    model, _ = store.put_blob([tag])
    config, _ = store.put_blob([b'{"tolerance": 0.01}'])
    return {"model": model, "config": config}


def running(store: JobStore, owner: str = "r1") -> Job:
    job, _ = store.submit(inputs(store))
    claimed = store.claim(owner)
    assert claimed is not None and claimed.id == job.id
    return claimed


@pytest.fixture
def url_and_artifacts(store_url: str, tmp_path: Path) -> tuple[str, Path]:
    return store_url, tmp_path / "artifacts"


# ---------------------------------------------------------------------------------------------- blobs


def test_put_blob_is_content_addressed_and_stored_once(store: JobStore) -> None:
    digest, size = store.put_blob([b"abc", b"", b"def"])
    assert (digest, size) == ("bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721", 6)
    path = store.blob_path(digest)
    assert path.read_bytes() == b"abcdef"
    assert path.parent.name == digest[:2]
    assert store.put_blob([b"abcdef"]) == (digest, 6)
    files = [p for p in (store.artifacts / "blobs").rglob("*") if p.is_file()]
    assert files == [path]


def test_blob_path_of_unknown_or_malformed_digest_is_a_key_error(store: JobStore) -> None:
    with pytest.raises(KeyError, match="no blob"):
        store.blob_path("0" * 64)
    with pytest.raises(KeyError, match="not a sha256 hex digest"):
        store.blob_path("../../etc/passwd")


def test_failing_chunk_iterator_leaves_no_file(store: JobStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"half of a model"
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError):
        store.put_blob(chunks())
    assert [p for p in (store.artifacts / "blobs").rglob("*") if p.is_file()] == []


def test_concurrent_equal_puts_store_one_file(store: JobStore) -> None:
    digests: list[str] = []
    run_threads(6, lambda i: digests.append(store.put_blob([b"x" * 100_000])[0]))
    assert len(set(digests)) == 1
    files = [p for p in (store.artifacts / "blobs").rglob("*") if p.is_file()]
    assert files == [store.blob_path(digests[0])]
    assert files[0].read_bytes() == b"x" * 100_000


# ----------------------------------------------------------------------------------------------- jobs


def test_submit_then_get(store: JobStore) -> None:
    given = inputs(store)
    job, created = store.submit(given)
    assert created
    assert job.state is JobState.QUEUED
    assert job.inputs == given
    assert (job.attempts, job.owner, job.cancel_requested, job.events) == (0, None, False, 0)
    assert (job.report_json, job.result, job.error_code, job.error_message) == (None, None, None, None)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert job.created == job.updated and abs(job.created - time.time()) < 600
    assert store.get(job.id) == job
    assert store.get("f" * 32) is None


def test_submit_with_the_same_idempotency_key_returns_the_existing_job(store: JobStore) -> None:
    first, created = store.submit(inputs(store), idempotency_key="ci-run-42")
    again, created_again = store.submit(inputs(store, b"other"), idempotency_key="ci-run-42")
    assert created and not created_again
    assert again == first
    other, created_other = store.submit(inputs(store), idempotency_key="ci-run-43")
    assert created_other and other.id != first.id
    plain1, _ = store.submit(inputs(store))
    plain2, _ = store.submit(inputs(store))
    assert plain1.id != plain2.id
    assert len(store.list()) == 4


def test_idempotent_submits_racing_in_threads_make_one_job(open_test_store: OpenStore) -> None:
    stores = [open_test_store() for _ in range(2)]
    results: list[tuple[Job, bool]] = []
    run_threads(8, lambda i: results.append(stores[i % 2].submit({"model": "0" * 64}, idempotency_key="same")))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(stores[0].list()) == 1


def test_idempotent_submits_racing_in_processes_make_one_job(
    store: JobStore, url_and_artifacts: tuple[str, Path], tmp_path: Path
) -> None:
    url, artifacts = url_and_artifacts
    results = run_children(url, artifacts, tmp_path, "submit", ["same"] * 3)
    lines = [line for out in results for line in out]
    assert len({line["id"] for line in lines}) == 1
    assert [line["created"] for line in lines].count(True) == 1
    assert [job.id for job in store.list()] == [lines[0]["id"]]


def test_list_is_newest_first_and_filters_by_state(store: JobStore) -> None:
    jobs = [store.submit(inputs(store))[0] for _ in range(4)]
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(limit=2)] == [jobs[3].id, jobs[2].id]
    claimed = store.claim("r1")
    assert claimed is not None
    assert [j.id for j in store.list(states=[JobState.RUNNING])] == [jobs[0].id]
    assert [j.id for j in store.list(states=[JobState.QUEUED])] == [j.id for j in reversed(jobs[1:])]
    assert store.list(states=list(FINISHED)) == []


def test_claim_takes_the_oldest_queued_job(store: JobStore) -> None:
    assert store.claim("r1") is None
    jobs = [store.submit(inputs(store))[0] for _ in range(3)]
    store.request_cancel(jobs[0].id)
    claimed = store.claim("r1")
    assert claimed is not None
    assert claimed.id == jobs[1].id
    assert (claimed.state, claimed.owner, claimed.attempts) == (JobState.RUNNING, "r1", 1)
    assert claimed.updated >= claimed.created
    assert store.get(claimed.id) == claimed
    second = store.claim("r2")
    assert second is not None and second.id == jobs[2].id and second.owner == "r2"
    assert store.claim("r1") is None


def test_claims_from_threads_give_each_job_exactly_once(open_test_store: OpenStore) -> None:
    stores = [open_test_store() for _ in range(2)]
    submitted = {stores[0].submit({"model": "0" * 64})[0].id for _ in range(40)}
    claimed: list[str] = []

    def claim_all(i: int) -> None:
        while (job := stores[i % 2].claim(f"r{i}")) is not None:
            claimed.append(job.id)

    run_threads(6, claim_all)
    assert sorted(claimed) == sorted(submitted)
    assert all(job.attempts == 1 for job in stores[0].list(limit=100))


def test_claims_from_processes_give_each_job_exactly_once(
    store: JobStore, url_and_artifacts: tuple[str, Path], tmp_path: Path
) -> None:
    submitted = {store.submit({"model": "0" * 64})[0].id for _ in range(60)}
    url, artifacts = url_and_artifacts
    results = run_children(url, artifacts, tmp_path, "claim", ["p0", "p1", "p2"])
    claimed = [line["id"] for out in results for line in out]
    assert sorted(claimed) == sorted(submitted)  # every job once: none twice, none lost
    assert all(line["attempts"] == 1 for out in results for line in out)
    owners = {job.owner for job in store.list(limit=100)}
    assert owners <= {"p0", "p1", "p2"}
    assert {job.state for job in store.list(limit=100)} == {JobState.RUNNING}


# --------------------------------------------------------------------------------------------- events


def test_events_are_gap_free_and_page_from_an_index(open_test_store: OpenStore) -> None:
    stores = [open_test_store() for _ in range(2)]
    job = running(stores[0])
    indices: list[int] = []
    run_threads(4, lambda i: indices.extend(stores[i % 2].append_event(job.id, f"{i}".encode()) for _ in range(25)))
    assert sorted(indices) == list(range(100))
    everything = stores[0].events(job.id)
    assert [i for i, _ in everything] == list(range(100))
    assert sorted(p for _, p in everything) == sorted(f"{i}".encode() for i in range(4) for _ in range(25))
    assert stores[1].events(job.id, start=95) == everything[95:]
    assert stores[1].events(job.id, start=10, limit=5) == everything[10:15]
    assert stores[1].events(job.id, start=100) == []
    got = stores[0].get(job.id)
    assert got is not None and got.events == 100


def test_events_of_an_unknown_job(store: JobStore) -> None:
    with pytest.raises(KeyError, match="no job"):
        store.append_event("f" * 32, b"x")
    assert store.events("f" * 32) == []


def test_event_payloads_are_bytes_kept_exactly(store: JobStore) -> None:
    job = running(store)
    payloads = [b"", b"\x00\xff\x00", bytes(range(256)) * 40]
    for payload in payloads:
        store.append_event(job.id, payload)
    assert store.events(job.id) == list(enumerate(payloads))


# --------------------------------------------------------------------------------------------- finish


def test_finish_sets_the_outcome_and_never_overwrites(store: JobStore) -> None:
    job = running(store)
    result, _ = store.put_blob([b"pruned"])
    done = store.finish(job.id, JobState.SUCCEEDED, report_json='{"ok": true}', result=result)
    assert (done.state, done.report_json, done.result, done.owner) == (JobState.SUCCEEDED, '{"ok": true}', result, "r1")
    assert store.get(job.id) == done
    for state in FINISHED:
        with pytest.raises(ValueError, match="already succeeded"):
            store.finish(job.id, state, error_code="InternalError", error_message="late")
    assert store.get(job.id) == done


def test_finish_failed_keeps_the_error(store: JobStore) -> None:
    job = running(store)
    done = store.finish(job.id, JobState.FAILED, error_code="InvalidInputError", error_message="no eval set")
    assert (done.state, done.error_code, done.error_message) == (JobState.FAILED, "InvalidInputError", "no eval set")


def test_finish_rejects_bad_calls(store: JobStore) -> None:
    job = running(store, "r1")
    with pytest.raises(ValueError, match="running"):
        store.finish(job.id, JobState.RUNNING)
    with pytest.raises(ValueError, match="a finished state is one of"):
        store.finish(job.id, JobState.QUEUED)
    with pytest.raises(KeyError, match="no job"):
        store.finish("f" * 32, JobState.FAILED)
    with pytest.raises(ValueError, match="no longer r2's running job"):
        store.finish(job.id, JobState.SUCCEEDED, owner="r2")
    assert store.finish(job.id, JobState.SUCCEEDED, owner="r1").state is JobState.SUCCEEDED


# --------------------------------------------------------------------------------------------- cancel


def test_cancel_in_each_state(store: JobStore) -> None:
    queued, _ = store.submit(inputs(store))
    cancelled = store.request_cancel(queued.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.error_code == "CancelledError"

    job = running(store)
    requested = store.request_cancel(job.id)
    assert (requested.state, requested.cancel_requested, requested.owner) == (JobState.RUNNING, True, "r1")
    assert store.request_cancel(job.id) == store.get(job.id)  # asking twice changes nothing more
    done = store.finish(job.id, JobState.CANCELLED, error_code="CancelledError", error_message="cancelled")
    assert store.request_cancel(job.id) == done

    succeeded = running(store)
    succeeded = store.finish(succeeded.id, JobState.SUCCEEDED)
    assert store.request_cancel(succeeded.id) == succeeded

    with pytest.raises(KeyError, match="no job"):
        store.request_cancel("f" * 32)


# ------------------------------------------------------------------------------------------- recovery


def test_recover_requeues_the_jobs_of_a_restarted_owner(store: JobStore) -> None:
    mine = running(store, "r1")
    theirs = running(store, "r2")
    store.heartbeat("r1")
    store.heartbeat("r2")
    changed = store.recover(owner="r1")
    assert [j.id for j in changed] == [mine.id]
    assert (changed[0].state, changed[0].owner, changed[0].attempts) == (JobState.QUEUED, None, 1)
    assert store.get(mine.id) == changed[0]
    got = store.get(theirs.id)
    assert got is not None and (got.state, got.owner) == (JobState.RUNNING, "r2")
    # requeued first in line again (it is the oldest), and its next claim is attempt 2
    again = store.claim("r1-restarted")
    assert again is not None and (again.id, again.attempts) == (mine.id, 2)


def test_recover_requeues_the_jobs_of_a_silent_owner(store: JobStore) -> None:
    dead = running(store, "dead")
    time.sleep(2.1)
    alive = running(store, "alive")
    store.heartbeat("alive")
    # dead's last sign of life is over 2 s old whatever the load; alive's would need a 2 s stall to look as old
    changed = store.recover(dead_after=2.0)
    assert [(j.id, j.state) for j in changed] == [(dead.id, JobState.QUEUED)]
    got = store.get(alive.id)
    assert got is not None and got.state is JobState.RUNNING
    assert store.recover(dead_after=3600) == []


def test_recover_fails_a_job_after_max_attempts(store: JobStore) -> None:
    job, _ = store.submit(inputs(store))
    for attempt in (1, 2):
        claimed = store.claim(f"r{attempt}")
        assert claimed is not None and claimed.attempts == attempt
        (requeued,) = store.recover(owner=f"r{attempt}", max_attempts=3)
        assert requeued.state is JobState.QUEUED
    claimed = store.claim("r3")
    assert claimed is not None and claimed.attempts == 3
    (failed,) = store.recover(owner="r3", max_attempts=3)
    assert failed.state is JobState.FAILED
    assert failed.error_code == "JobCrashedError"
    assert failed.error_message is not None and "3 attempts" in failed.error_message
    assert store.get(job.id) == failed
    assert store.claim("r4") is None


def test_recover_cancels_a_job_whose_cancel_was_requested(store: JobStore) -> None:
    job = running(store, "r1")
    store.request_cancel(job.id)
    (changed,) = store.recover(owner="r1")
    assert (changed.state, changed.error_code) == (JobState.CANCELLED, "CancelledError")


def test_recover_leaves_queued_and_finished_jobs_alone(store: JobStore) -> None:
    done = running(store, "r1")
    done = store.finish(done.id, JobState.SUCCEEDED)
    queued, _ = store.submit(inputs(store))
    assert store.recover(owner="r1", dead_after=0.0) == []
    assert store.get(queued.id) == queued
    assert store.get(done.id) == done


# -------------------------------------------------------------------------------------------- cleanup


def finished_job(store: JobStore, model: bytes, result: bytes, shared: bytes = b"config") -> Job:
    model_digest, _ = store.put_blob([model])
    shared_digest, _ = store.put_blob([shared])
    result_digest, _ = store.put_blob([result])
    job, _ = store.submit({"model": model_digest, "config": shared_digest})
    claimed = store.claim("r1")
    assert claimed is not None and claimed.id == job.id
    store.append_event(job.id, b"progress")
    return store.finish(job.id, JobState.SUCCEEDED, result=result_digest)


def test_cleanup_by_ttl_deletes_old_finished_jobs_and_their_blobs(store: JobStore) -> None:
    old = finished_job(store, b"old model", b"old result")
    time.sleep(0.05)
    job = running(store, "r2")
    queued, _ = store.submit({"model": store.put_blob([b"queued model"])[0], "config": store.put_blob([b"config"])[0]})
    orphan, _ = store.put_blob([b"nobody refers to me"])

    assert store.cleanup(ttl=3600).jobs_deleted == 0  # nothing that old
    assert store.get(old.id) is not None

    stats = store.cleanup(ttl=0.0, grace=0)
    assert stats.jobs_deleted == 1
    assert store.get(old.id) is None
    assert store.events(old.id) == []
    assert store.get(queued.id) == queued
    got = store.get(job.id)
    assert got is not None and got.state is JobState.RUNNING
    # the old job's own blobs and the orphan are gone; the config the queued job shares stays
    assert old.result is not None
    for gone in (old.inputs["model"], old.result, orphan):
        with pytest.raises(KeyError):
            store.blob_path(gone)
    assert store.blob_path(old.inputs["config"]).read_bytes() == b"config"
    assert store.blob_path(queued.inputs["model"]).read_bytes() == b"queued model"
    assert stats.blobs_deleted == 3
    assert stats.bytes_freed == len(b"old model") + len(b"old result") + len(b"nobody refers to me")


def test_cleanup_keeps_young_unreferenced_blobs(store: JobStore) -> None:
    digest, _ = store.put_blob([b"uploaded, job not submitted yet"])
    assert store.cleanup(ttl=0.0).blobs_deleted == 0  # the default grace period
    assert store.blob_path(digest).is_file()
    assert store.cleanup(ttl=0.0, grace=0).blobs_deleted == 1


def test_cleanup_by_max_bytes_deletes_the_oldest_finished_jobs_first(store: JobStore) -> None:
    kb = 1000
    jobs = [finished_job(store, bytes([i]) * kb, bytes([100 + i]) * kb, shared=b"s" * kb) for i in range(4)]
    live = running(store, "r9")  # its blobs (b"model", the config) count too and are never deleted
    live_bytes = sum(store.blob_path(d).stat().st_size for d in live.inputs.values())
    # 4 jobs x (model + result) + the shared config + the live job's blobs; keep room for two finished jobs
    stats = store.cleanup(max_bytes=2 * 2 * kb + kb + live_bytes, grace=0)
    assert stats.jobs_deleted == 2
    assert [store.get(j.id) is None for j in jobs] == [True, True, False, False]
    assert stats.bytes_left == 2 * 2 * kb + kb + live_bytes
    assert store.blob_path(jobs[0].inputs["config"]).stat().st_size == kb  # shared: still referenced
    # a budget below what QUEUED/RUNNING jobs need deletes every finished job and never the live one
    store.cleanup(max_bytes=0, grace=0)
    assert [j.id for j in store.list()] == [live.id]
    for digest in live.inputs.values():
        assert store.blob_path(digest).is_file()


# ----------------------------------------------------------------------------------------- durability


def test_a_reopened_store_sees_everything(open_test_store: OpenStore) -> None:
    store = open_test_store()
    done = finished_job(store, b"m", b"r")
    job = running(store, "r1")
    store.append_event(job.id, b"e0")
    store.request_cancel(job.id)
    keyed, _ = store.submit(inputs(store), idempotency_key="k")
    store.heartbeat("r1")
    before = store.list()
    store.close()

    reopened = open_test_store()
    assert reopened.list() == before
    assert reopened.events(job.id) == [(0, b"e0")]
    assert reopened.submit(inputs(reopened), idempotency_key="k") == (keyed, False)
    assert done.result is not None
    assert reopened.blob_path(done.result).read_bytes() == b"r"
    assert [j.id for j in reopened.recover(owner="r1")] == [job.id]


def test_a_closed_store_refuses_calls(store: JobStore) -> None:
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.list()


# ------------------------------------------------------------------------------------------- open_store


def test_open_store_rejects_an_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scheme 'mysql'"):
        open_store("mysql://db/jobs", tmp_path)


def test_open_store_rejects_a_sqlite_file_in_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        open_store(f"sqlite://{tmp_path}/missing/jobs.db", tmp_path)
    with pytest.raises(ValueError, match="names no database file"):
        open_store("sqlite://", tmp_path)


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    open_store(f"sqlite://{tmp_path}/jobs.db", tmp_path).close()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ValueError, match="schema version 99, newer"):
        open_store(f"sqlite://{tmp_path}/jobs.db", tmp_path)


def test_sqlite_store_is_in_wal_mode(tmp_path: Path) -> None:
    open_store(f"sqlite://{tmp_path}/jobs.db", tmp_path).close()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ------------------------------------------------------------------------------------------ PostgreSQL


def test_postgres_replicas_claim_and_submit_on_one_database(postgres_db: str, tmp_path: Path) -> None:
    """Two replicas (store objects) on one PostgreSQL database and one artifacts folder."""
    replicas = [open_store(postgres_db, tmp_path / "shared") for _ in range(2)]
    try:
        # a blob one replica stored is served by the other
        digest, _ = replicas[0].put_blob([b"uploaded to replica 0"])
        assert replicas[1].blob_path(digest).read_bytes() == b"uploaded to replica 0"
        # every key submitted by both replicas at once: one job each
        submits: list[tuple[str, Job, bool]] = []
        run_threads(
            8,
            lambda i: submits.extend(
                (f"k{n}", *replicas[i % 2].submit({"model": digest}, idempotency_key=f"k{n}")) for n in range(10)
            ),
        )
        by_key: dict[str, set[str]] = {}
        for key, job, _ in submits:
            by_key.setdefault(key, set()).add(job.id)
        assert all(len(ids) == 1 for ids in by_key.values())
        assert sum(created for _, _, created in submits) == 10
        # both replicas' runners claiming at once: each job once
        claimed: list[tuple[str, str]] = []

        def claim_all(i: int) -> None:
            owner = f"replica{i % 2}"
            while (job := replicas[i % 2].claim(owner)) is not None:
                claimed.append((job.id, owner))

        run_threads(6, claim_all)
        assert sorted(job_id for job_id, _ in claimed) == sorted(ids.pop() for ids in by_key.values())
        for job_id, owner in claimed:
            got = replicas[1 - int(owner[-1])].get(job_id)
            assert got is not None and (got.owner, got.attempts) == (owner, 1)
    finally:
        for replica in replicas:
            replica.close()


def test_postgres_replicas_opening_a_new_database_at_once(postgres_db: str, tmp_path: Path) -> None:
    stores: list[JobStore] = []
    run_threads(6, lambda i: stores.append(open_store(postgres_db, tmp_path)))
    try:
        job, _ = stores[0].submit({"model": "0" * 64})
        assert all(s.get(job.id) == job for s in stores)
    finally:
        for s in stores:
            s.close()


def test_postgres_unreachable_database_is_a_value_error_naming_it(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        url = f"postgresql://jobs:secret@127.0.0.1:{port}/jobs"
        with pytest.raises(
            ValueError, match=f"cannot open the job store postgresql://jobs:\\*\\*\\*@127.0.0.1:{port}/jobs"
        ) as e:
            open_store(url, tmp_path)
    assert "secret" not in str(e.value)


def test_postgres_without_the_driver_names_the_extra(tmp_path: Path) -> None:
    # a fresh interpreter in which `import psycopg` fails, as where the extra is not installed
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from pathlib import Path\n"
        "from service.jobs.store import open_store\n"
        "try:\n"
        f"    open_store('postgresql://u@127.0.0.1:1/db', Path({str(tmp_path)!r}))\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "pip install 'onnx-pruner[postgres]'" in out.stdout


def test_a_forked_child_uses_connections_of_its_own(store: JobStore) -> None:
    first, _ = store.submit({"model": "0" * 64})
    second, _ = store.submit({"model": "1" * 64})
    assert store.get(first.id) is not None  # the parent's connection exists before the fork
    pid = os.fork()
    if pid == 0:  # the child: claim one job, close the store, leave without running the parent's finalizers
        ok = False
        try:
            job = store.claim("child")
            ok = job is not None and job.id == first.id
            store.close()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's connection survived the child's close()
    got = store.get(first.id)
    assert got is not None and (got.state, got.owner) == (JobState.RUNNING, "child")
    claimed = store.claim("parent")
    assert claimed is not None and claimed.id == second.id


def open_connections(store: JobStore, url: str) -> int:
    """How many database connections this process holds open on the store's database."""
    if url.startswith("sqlite"):
        db = Path(url[len("sqlite://") :]).resolve()
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if _link(fd) == str(db))
    import psycopg

    with psycopg.connect(url) as admin:
        row = admin.execute(
            "SELECT count(*) - 1 FROM pg_stat_activity "  # - 1: this admin connection
            "WHERE datname = current_database() AND backend_type = 'client backend'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def settled_connections(store: JobStore, url: str, at_most: int) -> int:
    """``open_connections`` once it is down to ``at_most``, or after 5 s: a PostgreSQL backend
    leaves pg_stat_activity a moment after its client closed the connection."""
    deadline = time.monotonic() + 5
    while (count := open_connections(store, url)) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def test_connections_of_ended_threads_are_closed(store: JobStore, store_url: str) -> None:
    job, _ = store.submit({"model": "0" * 64})
    for _ in range(20):  # a thread per call, as a server that starts a thread per job
        thread = threading.Thread(target=store.get, args=(job.id,))
        thread.start()
        thread.join()
    # this thread's connection, plus at most the last ended thread's (closed when the next one opens); SQLite
    # may hold back closing a file descriptor while another connection of the process has a lock: 4, not 21
    assert settled_connections(store, store_url, 4) <= 4
    store.close()
    assert settled_connections(store, store_url, 0) == 0
