"""Job store fixtures: a store on each backend, and a real PostgreSQL server started for the session.

The PostgreSQL server is Debian's (``apt-get install postgresql``; ``.ci/run`` installs it): ``initdb`` and
``postgres`` run as an unprivileged user (postgres refuses root) in a temp folder, listening on a free
loopback port, and are stopped at the end of the session. Each test gets a database of its own.
Without PostgreSQL the PostgreSQL tests skip with the reason, except under CI (``CI`` or
``PRUNER_CI_REQUIRE_POSTGRES`` set), where they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.jobs.store import JobStore, open_store

OpenStore = Callable[[], JobStore]

#: the user postgres runs as (it refuses to run as root)
PG_USER = "nobody"


def _require_postgres() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("PRUNER_CI_REQUIRE_POSTGRES"))


def _pg_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, postgres), newest version first."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for path in candidates:
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` when we are root (nothing otherwise)."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"]


def _unavailable(reason: str) -> None:
    if _require_postgres():
        pytest.fail(f"PostgreSQL is required under CI but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need a PostgreSQL server: {reason} (apt-get install postgresql)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server for the session; yields its base URL (``postgresql://postgres@127.0.0.1:PORT``)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install 'onnx-pruner[postgres]')")
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable("no initdb/postgres binaries were found (pg_config --bindir, /usr/lib/postgresql/*/bin)")
        raise AssertionError  # unreachable: _unavailable raises
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        _unavailable("we are root and setpriv (util-linux) is missing to run postgres as another user")
    root = Path(tempfile.mkdtemp(prefix="pruner-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        entry = pwd.getpwnam(PG_USER)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    prefix = _as_user(PG_USER)
    init = subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,  # a folder the unprivileged user can enter, wherever the tests run from
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed ({init.returncode}): {init.stderr.strip()}", pytrace=False)
    port = _free_port()
    log = open(root / "postgres.log", "wb")  # closed after the server stops
    server = subprocess.Popen(
        [
            *prefix,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-k",
            str(sockets),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            # a test server: durability of the server's own files is not what the tests check
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}"
    try:
        _wait_ready(url, server, root / "postgres.log")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            pytest.fail(f"postgres exited with {server.returncode}: {log.read_text(errors='replace')}", pytrace=False)
        try:
            with psycopg.connect(url + "/postgres", connect_timeout=5):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.fail(f"postgres did not accept connections in 120 s: {log.read_text(errors='replace')}")
            time.sleep(0.2)


@pytest.fixture
def postgres_db(postgres_server: str) -> str:
    """The URL of a fresh, empty database on the session's server."""
    import psycopg

    name = "jobs_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store URL on each backend (a fresh database)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("postgres_db"))


@pytest.fixture
def open_test_store(store_url: str, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens stores on ``store_url`` with one artifacts folder (each call: another replica); closed at the end."""
    stores: list[JobStore] = []

    def open_() -> JobStore:
        store = open_store(store_url, tmp_path / "artifacts")
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


@pytest.fixture
def store(open_test_store: OpenStore) -> JobStore:
    """A job store on each backend."""
    return open_test_store()
