"""The PostgreSQL job store (for replicas): not written yet."""

from __future__ import annotations

from pathlib import Path

from service.jobs.store import JobStore


def PostgresStore(url: str, artifacts: Path) -> JobStore:
    raise ValueError("the PostgreSQL job store is not implemented yet")
