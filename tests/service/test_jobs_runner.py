"""The job runner's loop, on a real SQLite store (no worker is started: nothing is queued)."""

from __future__ import annotations

import time
from pathlib import Path

from service.jobs.runner import Runner
from service.jobs.sqlite import SQLiteStore
from service.jobs.store import Job


class CountingStore(SQLiteStore):
    """The real store, counting the claims (each one a write transaction, committed and synced)."""

    claims = 0

    def claim(self, owner: str) -> Job | None:
        self.claims += 1
        return super().claim(owner)


def test_an_idle_runner_polls_with_reads_and_commits_no_claims(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = CountingStore(tmp_path / "jobs.db", tmp_path)
    runner = Runner(store, store_url=url, artifacts=tmp_path, replica_id="idle", workers=1)
    runner.start()
    time.sleep(1.5)  # about 7 polls
    runner.stop(grace=0)
    assert store.claims == 0
    assert store.list() == []
    store.close()
