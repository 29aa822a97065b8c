"""Shared fixtures: a real PostgreSQL server, a fresh database per test, a project dir.

The server is the embedded one from pgserver unless MOMENTRY_TEST_DATABASE_URL
names another (for example the machine's PostgreSQL). Every test gets its own
database, created here and dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import settings as hypothesis_settings
from psycopg import sql

# Hypothesis: in CI (the CI variable set) every run draws the same examples, so CI never fails on
# an example no earlier run drew; a failure prints the blob that reproduces it. Elsewhere the
# default profile stays (unless Hypothesis itself detects a CI service): each run draws new
# examples and keeps exploring, and a failure found there becomes an @example.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL_VAR = "MOMENTRY_TEST_DATABASE_URL"
# Tests marked with these need a server from outside, and are skipped without its URL. MongoDB is not
# among them: its tests run on SecantusDB, started by the mongo_url fixture.
REAL_SERVERS = {"qdrant": "QDRANT_URL"}


def _pg_bin(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)




REDIS_URL_VAR = "MOMENTRY_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def _redis_test_url() -> str | None:
    """The Redis that tests may use: MOMENTRY_TEST_REDIS_URL, or the machine's on db 15 if it answers."""
    import redis

    url = os.environ.get(REDIS_URL_VAR, DEFAULT_REDIS_URL)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
        return url
    except redis.RedisError:
        return None


REDIS_TEST_URL = _redis_test_url()


def pytest_report_header(config: pytest.Config) -> list[str]:
    url = os.environ.get(ADMIN_URL_VAR)
    lines = [f"postgres under test: {_mask(url) if url else 'embedded pgserver (set ' + ADMIN_URL_VAR + ' for another)'}"]
    if REDIS_TEST_URL is None:
        lines.append(f"redis tests SKIPPED: no Redis answers at {os.environ.get(REDIS_URL_VAR, DEFAULT_REDIS_URL)} "
                     f"(set {REDIS_URL_VAR})")
    lines.append("mongo under test: SecantusDB (secantusd-py), one in-memory server per session")
    missing = [f"{marker} ({var})" for marker, var in REAL_SERVERS.items() if not os.environ.get(var)]
    if missing:
        lines.append(f"real-server tests SKIPPED for {', '.join(missing)}: set the URL to run them")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REDIS_TEST_URL is None:
        skip = pytest.mark.skip(reason=f"no Redis answers; set {REDIS_URL_VAR}")
        for item in items:
            if item.get_closest_marker("redis"):
                item.add_marker(skip)
    for marker, var in REAL_SERVERS.items():
        if os.environ.get(var):
            continue
        skip = pytest.mark.skip(reason=f"needs a real server: set {var}")
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(skip)


def _mask(url: str) -> str:
    from momentry_db.environments import mask_url

    return mask_url(url)


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A libpq URL with rights to create databases."""
    url = os.environ.get(ADMIN_URL_VAR)
    if url:
        yield url.replace("postgresql+psycopg://", "postgresql://")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    pgdata = Path(tempfile.mkdtemp(prefix="momentry-test-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@dataclass
class Database:
    """A fresh database for one test."""

    name: str
    url: str  # libpq form

    @property
    def sa_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    def query(self, text: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(text, params or None)
            return cur.fetchall() if cur.description else []

    def execute(self, text: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(text)

    def tables(self, schema: str, kind: str = "BASE TABLE") -> set[str]:
        rows = self.query("SELECT table_name FROM information_schema.tables "
                          "WHERE table_schema = %s AND table_type = %s", (schema, kind))
        return {r[0] for r in rows}

    def dump_schema(self, schema: str) -> str:
        out = subprocess.run([_pg_bin("pg_dump"), "--schema-only", "--no-owner", "-n", schema, self.url],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def psql_file(self, path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_pg_bin("psql"), "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path), self.url],
                              capture_output=True, text=True)


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def database(admin_url: str) -> Iterator[Database]:
    name = f"momentry_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield Database(name, _with_database(admin_url, name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class Project:
    """A project directory with its own env and state dir, pointed at a test database."""

    root: Path
    environ: dict[str, str]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        """Run momentry-db in-process, as a user would, and capture output and exit code."""
        from momentry_db.cli import main

        runner = CliRunner()
        merged = {**self.environ, **(env or {})}
        result = runner.invoke(main, ["--project-dir", str(self.root), *args], env=merged,
                               catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    def run_env(self) -> dict[str, str]:
        """The environment a subprocess of this project runs with."""
        return {**_clean_environ(), **self.environ}

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        """Run a real subprocess in the project directory (momentry-db or alembic)."""
        merged = {**self.run_env(), **(env or {})}
        proc = subprocess.run(list(argv), cwd=self.root, env=merged, capture_output=True, text=True,
                              timeout=timeout)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def momentry_db(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        return self.run(sys.executable, "-m", "momentry_db.cli", *args, env=env)

    def alembic(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        return self.run(sys.executable, "-m", "alembic", *args, env=env)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


_SETTINGS_VARS = ("DATABASE_URL", "DATABASE_SCHEMA", "MONGODB_URL", "MONGODB_DATABASE", "QDRANT_URL",
                  "QDRANT_API_KEY", "QDRANT_COLLECTION", "REDIS_URL", "MOMENTRY_REDIS_PREFIX",
                  "MOMENTRY_EXTRA_ENVS", "MOMENTRY_STATE_DIR", "MOMENTRY_PROJECT_DIR", "MOMENTRY_EMBEDDED")
# Tests start no embedded server unless they say so: each test has its own state dir, and a server
# left running per test would add up to hundreds of processes.
NO_EMBEDDED = {"MOMENTRY_EMBEDDED": "off"}


# Read at import, before each test clears settings from the environment.
_REAL_SERVER_URLS = {var: os.environ[var] for var in REAL_SERVERS.values() if os.environ.get(var)}


@pytest.fixture(scope="session")
def real_servers() -> dict[str, str]:
    """URLs of the real MongoDB / Qdrant servers given to this run."""
    return dict(_REAL_SERVER_URLS)


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SETTINGS_VARS}


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the developer's shell must not leak into tests."""
    for var in _SETTINGS_VARS:
        monkeypatch.delenv(var, raising=False)


def stop_embedded_servers(state_dir: Path) -> None:
    """Stop the embedded PostgreSQL and MongoDB servers under ``state_dir``, if any run."""
    from momentry_db.stores import embedded_mongo
    from momentry_db.stores.embedded import stop_embedded

    if (state_dir / "mongo" / "server.json").exists():
        embedded_mongo.stop(state_dir)
    if (state_dir / "pg" / "postmaster.pid").exists():
        stop_embedded(state_dir)


@pytest.fixture
def traversable_tmp() -> Iterator[Path]:
    """A temporary directory outside pytest's own, for tests that start the embedded PostgreSQL.

    As root, pgserver runs PostgreSQL as the user ``pgserver``, which must traverse every
    parent directory; pytest resets its base directory to mode 0700 whenever a test run
    starts, which would lock out a server that another run is starting at that moment.
    """
    path = Path(tempfile.mkdtemp(prefix="momentry-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        stop_embedded_servers(path / "state")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_embedded_server_left(tmp_path: Path) -> Iterator[None]:
    """A safety net: no embedded server a test started outlives it."""
    yield
    for marker in (*tmp_path.glob("*/mongo/server.json"), *tmp_path.glob("*/*/mongo/server.json"),
                   *tmp_path.glob("*/pg/postmaster.pid"), *tmp_path.glob("*/*/pg/postmaster.pid")):
        stop_embedded_servers(marker.parents[1])


@pytest.fixture
def project(tmp_path: Path, database: Database) -> Project:
    """A project whose environments point at this test's database."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "alembic.ini", root / "alembic.ini")
    (root / "alembic.ini").write_text(
        (root / "alembic.ini").read_text().replace("%(here)s/migrations", str(REPO / "migrations")))
    return Project(root, {"DATABASE_URL": database.url, "MOMENTRY_STATE_DIR": str(tmp_path / "state"),
                          **NO_EMBEDDED})


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback TCP port that accepts connections and never answers; records every accept."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture
def redis_url() -> str:
    assert REDIS_TEST_URL is not None  # tests marked redis are skipped otherwise
    return REDIS_TEST_URL


@pytest.fixture
def migrated(project, database) -> Project:
    """A project whose prod, then dev, were migrated through the CLI (every store)."""
    for env in ("prod", "dev"):
        result = project.cli("migrate", "--env", env)
        assert result.code == 0, result.err
    return project


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def secantus_server() -> Iterator[str]:
    """Run SecantusDB (a MongoDB-wire-protocol server) in memory as a separate process; yield its URL.

    The port is free when chosen but may be taken before the server binds it, even by another
    test run's server: the server that answers must report this process's pid, or it starts again.
    """
    binary = Path(sys.executable).parent / "secantusd-py"
    assert binary.exists(), "secantusd-py is not installed: it comes with momentry-db (PyPI SecantusDB)"
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port),
                                 "--storage-path", ":memory:"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _answers_as(proc, port):
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError("secantusd-py did not start on a port of its own in 5 tries")
    try:
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true"
    finally:
        # In memory there is nothing to flush, and a graceful stop takes about 2 s per server.
        proc.kill()
        proc.wait()


def _answers_as(proc: subprocess.Popen, port: int, wait: float = 20) -> bool:
    """Whether the server on ``port`` answers within ``wait`` seconds and is ``proc``."""
    import time

    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                      serverSelectionTimeoutMS=300)
    deadline = time.monotonic() + wait
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                return client.admin.command("serverStatus").get("pid") == proc.pid
            except PyMongoError:
                time.sleep(0.1)
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """A real MongoDB-wire server shared by this session; each test uses databases of its own."""
    with secantus_server() as url:
        yield url


@pytest.fixture
def fresh_mongo_url() -> Iterator[str]:
    """A real MongoDB-wire server of this test's own, for tests that use the default database names."""
    with secantus_server() as url:
        yield url


@pytest.fixture
def mongo_db_name(mongo_url: str) -> Iterator[str]:
    """A database name of this test's own on the session's server, dropped afterwards."""
    from pymongo import MongoClient

    name = f"momentry_t_{uuid.uuid4().hex[:10]}"
    yield name
    client = MongoClient(mongo_url)
    client.drop_database(name)
    client.close()


@pytest.fixture
def mongo_project(tmp_path: Path, mongo_url: str, mongo_db_name: str) -> Project:
    """A project whose dev environment's MongoDB is this test's own database on the session's server."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, {"MONGODB_URL": mongo_url, "MONGODB_DATABASE": mongo_db_name,
                          "MOMENTRY_STATE_DIR": str(tmp_path / "state"), **NO_EMBEDDED})


@pytest.fixture
def bare_project(tmp_path: Path) -> Project:
    """A project with its own state dir and no server configured (local defaults; embedded servers off)."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, {"MOMENTRY_STATE_DIR": str(tmp_path / "state"), **NO_EMBEDDED})
