"""Helpers the test modules share: the repository root, the project and database handles, planted
revisions and Qdrant points. Test modules import from here, never from one another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]

SETTINGS_VARS = ("DATABASE_URL", "DATABASE_SCHEMA", "MONGODB_URL", "MONGODB_DATABASE", "QDRANT_URL",
                 "QDRANT_API_KEY", "QDRANT_COLLECTION", "REDIS_URL", "MOMENTRY_REDIS_PREFIX",
                 "MOMENTRY_EXTRA_ENVS", "MOMENTRY_STATE_DIR", "MOMENTRY_PROJECT_DIR", "MOMENTRY_EMBEDDED")
# Tests start no embedded server unless they say so: each test has its own state dir, and a server
# left running per test would add up to hundreds of processes.
NO_EMBEDDED = {"MOMENTRY_EMBEDDED": "off"}


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
