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
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql

# Under mutmut (scripts/mutation) the package must come from mutants/, which mutmut puts on sys.path:
# an editable install's finder would otherwise hand the tests the unmutated source.
if "mutmut" in sys.modules:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]

from tests.helpers import (
    NO_EMBEDDED,
    NO_GRANTS,
    REPO,
    SETTINGS_VARS,
    Database,
    Granted,
    Project,
    stop_embedded_servers,
    with_database,
)

# Hypothesis: in CI (the CI variable set) every run draws the same examples, so CI never fails on
# an example no earlier run drew; a failure prints the blob that reproduces it. Elsewhere the
# default profile stays (unless Hypothesis itself detects a CI service): each run draws new
# examples and keeps exploring, and a failure found there becomes an @example.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")
# Under mutmut every mutant reruns the property tests: fewer (fixed) examples keep a run near 20 minutes.
hypothesis_settings.register_profile("mutation", derandomize=True, database=None, max_examples=25)
if "mutmut" in sys.modules:
    hypothesis_settings.load_profile("mutation")

ADMIN_URL_VAR = "MOMENTRY_TEST_DATABASE_URL"
# Under pytest-xdist (scripts/test runs one worker per CPU) every worker has its own session: its own
# embedded PostgreSQL, SecantusDB server, template database and temporary directories. The worker's
# name goes into every database and directory name the suite creates, beside a random part, so two
# workers (or two runs on one server) never share one.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
# Tests marked with these need a server from outside, and are skipped without its URL. MongoDB is not
# among them: its tests run on SecantusDB, started by the mongo_url fixture.
REAL_SERVERS = {"qdrant": "QDRANT_URL"}


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


# Fixtures that need PostgreSQL (embedded or not), a project wired to it, or a server from outside.
# ``--no-postgres`` leaves out the tests that use them: what is left runs in seconds, and is what
# scripts/mutation runs for every mutant (the Mongo lock's tests keep their in-memory SecantusDB).
SERVER_FIXTURES = frozenset({"admin_url", "database", "project", "bare_project", "migrated", "migrated_template",
                             "redis_url", "real_servers", "mongo_project", "fresh_mongo_url"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-postgres", action="store_true",
                     help="leave out the tests that need PostgreSQL, a project on it or an outside server")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--no-postgres"):
        kept = [i for i in items if not SERVER_FIXTURES & set(getattr(i, "fixturenames", ()))]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
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
    pgdata = Path(tempfile.mkdtemp(prefix=f"momentry-test-pg-{WORKER}-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
def database(admin_url: str) -> Iterator[Database]:
    name = f"momentry_test_{WORKER}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield Database(name, with_database(admin_url, name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# Read at import, before each test clears settings from the environment.
_REAL_SERVER_URLS = {var: os.environ[var] for var in REAL_SERVERS.values() if os.environ.get(var)}


@pytest.fixture(scope="session")
def real_servers() -> dict[str, str]:
    """URLs of the real MongoDB / Qdrant servers given to this run."""
    return dict(_REAL_SERVER_URLS)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the developer's shell must not leak into tests."""
    for var in SETTINGS_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def traversable_tmp() -> Iterator[Path]:
    """A temporary directory outside pytest's own, for tests that start the embedded PostgreSQL.

    As root, pgserver runs PostgreSQL as the user ``pgserver``, which must traverse every
    parent directory; pytest resets its base directory to mode 0700 whenever a test run
    starts, which would lock out a server that another run is starting at that moment.
    """
    path = Path(tempfile.mkdtemp(prefix=f"momentry-test-{WORKER}-"))
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
                          **NO_EMBEDDED, **NO_GRANTS})


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


@pytest.fixture(scope="session")
def migrated_template(admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A database and a state dir whose prod, then dev, were migrated through the CLI once per session.

    Tests that start from a migrated project copy both (``CREATE DATABASE ... TEMPLATE``), which is
    much faster than migrating again.
    """
    name = f"momentry_template_{WORKER}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = tmp_path_factory.mktemp("migrated-template")
    root = base / "project"
    root.mkdir()
    shutil.copy(REPO / "alembic.ini", root / "alembic.ini")
    (root / "alembic.ini").write_text(
        (root / "alembic.ini").read_text().replace("%(here)s/migrations", str(REPO / "migrations")))
    template = Project(root, {"DATABASE_URL": with_database(admin_url, name), "MOMENTRY_STATE_DIR": str(base / "state"),
                              **NO_EMBEDDED, **NO_GRANTS})
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in SETTINGS_VARS:
                mp.delenv(var, raising=False)
            for env in ("prod", "dev"):
                result = template.cli("migrate", "--env", env)
                assert result.code == 0, result.err
        with psycopg.connect(admin_url, autocommit=True) as conn:  # a template must have no session open
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        yield name, base / "state"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def migrated(project: Project, database: Database, admin_url: str,
             migrated_template: tuple[str, Path]) -> Project:
    """A project whose prod, then dev, were migrated through the CLI (every store): a copy of the template."""
    template, state = migrated_template
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database.name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(database.name),
                                                                      sql.Identifier(template)))
    shutil.copytree(state, project.environ["MOMENTRY_STATE_DIR"], dirs_exist_ok=True)
    return project


@pytest.fixture
def granted(migrated: Project, database: Database, admin_url: str) -> Iterator[Granted]:
    """A migrated project whose prod and dev roles are managed, named after this test's database, and
    one service login; migrate ran once more for each so the roles hold their grants. Every role the
    test creates through it is dropped afterwards: roles are cluster-wide."""
    prefix = "t" + database.name.removeprefix("momentry_test_")
    found = Granted(migrated, database, admin_url, {"prod": f"{prefix}_prod_app", "dev": f"{prefix}_dev_app"},
                    f"{prefix}_svc")
    found.created += [*found.roles.values(), found.login]
    try:
        found.write_toml()
        migrated.environ["MOMENTRY_PG_GRANTS"] = "on"
        found.database.execute(f"CREATE ROLE {found.login} LOGIN PASSWORD '{found.password}'")
        for env in ("prod", "dev"):
            result = migrated.cli("migrate", "--env", env, "--store", "postgres")
            assert result.code == 0, result.err
        yield found
    finally:
        found.drop_roles()


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

    name = f"momentry_t_{WORKER}_{uuid.uuid4().hex[:10]}"
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
                          "MOMENTRY_STATE_DIR": str(tmp_path / "state"), **NO_EMBEDDED, **NO_GRANTS})


@pytest.fixture
def bare_project(tmp_path: Path) -> Project:
    """A project with its own state dir and no server configured (local defaults; embedded servers off)."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, {"MOMENTRY_STATE_DIR": str(tmp_path / "state"), **NO_EMBEDDED, **NO_GRANTS})
