"""Helpers the test modules share: the repository root, the project and database handles, planted
revisions and Qdrant points. Test modules import from here, never from one another."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]

SETTINGS_VARS = ("DATABASE_URL", "DATABASE_SCHEMA", "MONGODB_URL", "MONGODB_DATABASE", "QDRANT_URL",
                 "QDRANT_API_KEY", "QDRANT_COLLECTION", "REDIS_URL", "MOMENTRY_REDIS_PREFIX",
                 "MOMENTRY_EXTRA_ENVS", "MOMENTRY_STATE_DIR", "MOMENTRY_PROJECT_DIR", "MOMENTRY_EMBEDDED",
                 "MOMENTRY_PG_GRANTS")
# Tests start no embedded server unless they say so: each test has its own state dir, and a server
# left running per test would add up to hundreds of processes.
NO_EMBEDDED = {"MOMENTRY_EMBEDDED": "off"}
# PostgreSQL roles are cluster-wide: tests leave them off unless they test them (tests/test_grants.py),
# and those use role names of their own (see Granted), so no test shares a role with another run.
NO_GRANTS = {"MOMENTRY_PG_GRANTS": "off"}


def clean_environ() -> dict[str, str]:
    """The process environment without any momentry-db setting (the developer's shell must not leak in)."""
    return {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}


def pg_bin(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


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
        out = subprocess.run([pg_bin("pg_dump"), "--schema-only", "--no-owner", "-n", schema, self.url],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def psql_file(self, path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([pg_bin("psql"), "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path), self.url],
                              capture_output=True, text=True)


def as_login(url: str, login: str, password: str) -> str:
    """The same server and database, reached as another login."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{login}:{quote(password)}@{host}"))


@dataclass
class Granted:
    """A migrated project whose prod and dev manage their PostgreSQL roles, named after this test's
    database, with one service login; every role a test adds is tracked and dropped afterwards."""

    project: Project
    database: Database
    admin_url: str
    roles: dict[str, str]  # environment -> its group role
    login: str  # a LOGIN role of this test, granted to nothing yet
    password: str = "svc-pw-1"
    created: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.login.rsplit("_", 1)[0]

    def write_toml(self) -> None:
        body = "".join(f'"{env}" = {{ role = "{role}" }}\n' for env, role in self.roles.items())
        (self.project.root / "momentry-db.toml").write_text("[environments]\n" + body)

    def declare(self, env: str) -> str:
        """Declare an environment with a role of this test; return the role."""
        role = f"{self.prefix}_{env.replace('-', '_')}_app"
        self.roles[env] = role
        self.created.append(role)
        self.write_toml()
        return role

    def create_login(self, suffix: str, *, login: bool = True) -> str:
        name = f"{self.prefix}_{suffix}"
        self.created.append(name)
        self.database.execute(f"CREATE ROLE {name} " + (f"LOGIN PASSWORD '{self.password}'" if login else "NOLOGIN"))
        return name

    def connect(self, login: str | None = None) -> psycopg.Connection:
        """A session as the login, opened as the service would open it (its search_path from the server)."""
        return psycopg.connect(as_login(self.database.url, login or self.login, self.password), autocommit=True)

    def drop_roles(self) -> None:
        names = [r[0] for r in self.database.query("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                                     (self.created,))]
        if names:
            self.database.execute(f"DROP OWNED BY {', '.join(names)}")
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                for name in names:
                    conn.execute(f"DROP ROLE {name}")


def with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


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
        return {**clean_environ(), **self.environ}

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        """Run a real subprocess in the project directory (momentry-db or alembic)."""
        merged = {**self.run_env(), **(env or {})}
        proc = subprocess.run(list(argv), cwd=self.root, env=merged, capture_output=True, text=True,
                              timeout=timeout)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def momentry_db(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        return self.run(sys.executable, "-m", "momentry_db.cli", *args, env=env)

    def imports(self, *args: str) -> tuple[set[str], CliResult]:
        """Run momentry-db in a real process: every module it imported, by full name, and its result
        (stderr without the import lines)."""
        ran = self.run(sys.executable, "-X", "importtime", "-m", "momentry_db.cli", "--project-dir",
                       str(self.root), *args, env={"PYTHONDONTWRITEBYTECODE": "1"})
        lines = ran.err.splitlines()
        modules = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
        err = "".join(f"{line}\n" for line in lines if not line.startswith("import time:"))
        return modules, CliResult(ran.code, ran.out, err)

    def alembic(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        return self.run(sys.executable, "-m", "alembic", *args, env=env)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


REVISION = '''"""{doc}"""
from alembic import op
import sqlalchemy as sa

from momentry_db.revision import on_primary

revision = "{rev}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_isolated()
    if on_primary():
        upgrade_shared()


def downgrade() -> None:
    pass


def upgrade_isolated() -> None:
{body}


def upgrade_shared() -> None:
    pass
'''


def plant(project, tmp_path: Path, body: str, doc: str = "planted", rev: str = "0002") -> Path:
    """Copy migrations/, add one revision, and point the project's alembic.ini at the copy."""
    scripts = tmp_path / "migrations"
    if not scripts.exists():
        shutil.copytree(REPO / "migrations", scripts, ignore=shutil.ignore_patterns("__pycache__"))
    down = "0001" if rev == "0002" else f"{int(rev) - 1:04d}"
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    (scripts / "versions" / f"{rev}_planted.py").write_text(REVISION.format(doc=doc, rev=rev, down=down,
                                                                            body=indented))
    ini = project.root / "alembic.ini"
    ini.write_text(ini.read_text().replace(str(REPO / "migrations"), str(scripts)))
    return scripts


def add_points(client: Any, name: str, n: int, size: int = 1024) -> None:
    """Upsert ``n`` points (ids 0..n-1, distinct vectors) into a Qdrant collection."""
    from qdrant_client import models

    client.upsert(name, points=[models.PointStruct(id=i, vector=[float(i + 1)] + [0.5] * (size - 1),
                                                   payload={"video_id": i}) for i in range(n)])


@contextmanager
def local_qdrant(state: Path) -> Iterator[Any]:
    """A client on the local-mode Qdrant in a project's state dir, closed afterwards."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(state / "qdrant"))
    try:
        yield client
    finally:
        client.close()


def stop_embedded_servers(state_dir: Path) -> None:
    """Stop the embedded PostgreSQL and MongoDB servers under ``state_dir``, if any run."""
    from momentry_db.stores import embedded_mongo
    from momentry_db.stores.embedded import stop_embedded

    if (state_dir / "mongo" / "server.json").exists():
        embedded_mongo.stop(state_dir)
    if (state_dir / "pg" / "postmaster.pid").exists():
        stop_embedded(state_dir)


@contextmanager
def secantus_with_auth(storage: Path, user: str, password: str) -> Iterator[str]:
    """SecantusDB with authentication and roles enforced (``--auth``), as a separate process; yields
    the administrator's URL (``user`` holds root).

    SecantusDB has no localhost exception: the administrator is created on a first start without
    ``--auth``, which is stopped gracefully (so the user is on disk), then the server starts again
    on the same storage with ``--auth``.
    """
    import socket
    import time

    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    binary = Path(sys.executable).parent / "secantusd-py"

    def start(*flags: str) -> tuple[subprocess.Popen, int]:
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port), "--storage-path",
                                     str(storage), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            probe: MongoClient = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                             serverSelectionTimeoutMS=300)
            deadline = time.monotonic() + 20
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    try:  # hello needs no login; its answer must come from this process's server
                        probe.admin.command("hello")
                        if _listens(proc.pid, port):
                            return proc, port
                    except PyMongoError:
                        pass
                    time.sleep(0.1)
            finally:
                probe.close()
            proc.kill()
            proc.wait()
        raise RuntimeError("secantusd-py did not start on a port of its own in 5 tries")

    proc, port = start()
    try:
        client: MongoClient = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true")
        client.admin.command("createUser", user, pwd=password, roles=["root"])
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, port = start("--auth")
    try:
        yield f"mongodb://{user}:{password}@127.0.0.1:{port}/?authSource=admin&directConnection=true"
    finally:
        proc.kill()
        proc.wait()


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` listens on ``port`` (another run's server may have taken the port first)."""
    import psutil

    try:
        return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.Error:
        return False


def document(result: CliResult, code: int | None = 0) -> dict[str, Any]:
    """The one JSON document a command printed, checked against docs/output.schema.json (and its exit code)."""
    import jsonschema

    if code is not None:
        assert result.code == code, result.out + result.err
    doc = json.loads(result.out)
    validator = jsonschema.Draft202012Validator(json.loads((REPO / "docs" / "output.schema.json").read_text()))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
    return doc  # type: ignore[no-any-return]


def wait_until(condition: Callable[[], Any], what: str, within: float = 60) -> Any:
    """Poll ``condition`` until it returns something true, and return that.

    ``within`` only keeps a broken test from hanging: it is generous, and nothing asserts how long
    the wait took.
    """
    deadline = time.monotonic() + within
    while not (found := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {within:g}s waiting for {what}")
        time.sleep(0.02)  # the pause between looks; only the condition ends the wait
    return found


@contextmanager
def live_process() -> Iterator[subprocess.Popen]:
    """A process of no interest that runs exactly as long as the block: it reads a pipe nobody writes."""
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def count_mongo_clients(monkeypatch: Any) -> list[str]:
    """Record the URL of every pymongo client momentry-db opens from now on (clients still connect)."""
    import pymongo

    opened: list[str] = []
    real = pymongo.MongoClient

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0] if args else kwargs.get("host"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pymongo, "MongoClient", counting)
    return opened
