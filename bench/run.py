"""momentry-db benchmark: prints ratios measured side by side, in one run, on this machine.

    .venv/bin/python bench/run.py            # embedded PostgreSQL (pgserver)
    MOMENTRY_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/run.py

(a) public + 50 environment schemas migrated from empty: momentry-db (one process) against 51
    `alembic -x schema=... upgrade head` processes and against psql applying the same offline SQL
    with one transaction per schema (the floor).
(b) a no-op `momentry-db migrate` at head, every store, against a bare `alembic current`.
(c) `momentry-db --help` against `python -c "import click"`.
(d) the longest stall a concurrent writer sees while a revision indexes a 1M-row isolated table,
    CREATE INDEX CONCURRENTLY against a plain CREATE INDEX.

It is a script, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_ENVS = 50
ROWS = 1_000_000


def pg_bin(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


def admin_url() -> tuple[str, object | None]:
    url = os.environ.get("MOMENTRY_BENCH_DATABASE_URL")
    if url:
        return url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="momentry-bench-pg-")), cleanup_mode="delete")
    return server.get_uri(), server


def with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class Bench:
    def __init__(self) -> None:
        self.admin, self.server = admin_url()
        self.work = Path(tempfile.mkdtemp(prefix="momentry-bench-"))
        shutil.copy(REPO / "alembic.ini", self.work / "alembic.ini")
        self.set_scripts(REPO / "migrations")
        self.envs = ",".join(f"b{i:02d}" for i in range(1, N_ENVS + 1))
        self.databases: list[str] = []

    def set_scripts(self, scripts: Path) -> None:
        text = (REPO / "alembic.ini").read_text().replace("%(here)s/migrations", str(scripts))
        (self.work / "alembic.ini").write_text(text)

    def fresh_db(self) -> str:
        name = f"momentry_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        return with_db(self.admin, name)

    def env(self, url: str, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MOMENTRY_", "DATABASE_", "MONGODB_",
                                                                           "QDRANT_", "REDIS_"))}
        return {**keep, "DATABASE_URL": url, "MOMENTRY_EXTRA_ENVS": self.envs,
                "MOMENTRY_STATE_DIR": str(self.work / "state"), **extra}

    def timed(self, argv: list[str], env: dict[str, str], stdin: str | None = None) -> float:
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=self.work, env=env, capture_output=True, text=True, input=stdin)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
        return elapsed

    def median(self, argv: list[str], env: dict[str, str], runs: int) -> float:
        return statistics.median(self.timed(argv, env) for _ in range(runs))

    def close(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        subprocess.run([str(BIN / "momentry-db"), "embedded", "stop"], cwd=self.work, capture_output=True,
                       env=self.env(""))
        shutil.rmtree(self.work, ignore_errors=True)
        if self.server is not None:
            self.server.cleanup()


def bench_a(b: Bench, rounds: int = 3) -> None:
    print(f"(a) public + {N_ENVS} environment schemas from empty (median of {rounds}, interleaved)")
    offline = subprocess.run([str(BIN / "alembic"), "upgrade", "head", "--sql"], cwd=b.work, env=b.env(""),
                             capture_output=True, text=True, check=True).stdout
    script = b.work / "all.sql"
    script.write_text(offline)
    ours_runs, floor_runs = [], []
    for _ in range(rounds):  # side by side, so both see the same machine
        url = b.fresh_db()
        ours_runs.append(b.timed([str(BIN / "momentry-db"), "migrate", "--all", "--store", "postgres"], b.env(url)))
        url = b.fresh_db()
        floor_runs.append(b.timed([pg_bin("psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script),
                                   url.replace("postgresql+psycopg://", "postgresql://")], b.env(url)))
    ours, floor = statistics.median(ours_runs), statistics.median(floor_runs)
    url = b.fresh_db()
    loop = 0.0
    for schema in ["public"] + [f"b{i:02d}" for i in range(1, N_ENVS + 1)]:
        loop += b.timed([str(BIN / "alembic"), "-x", f"schema={schema}", "upgrade", "head"], b.env(url))
    print(f"    momentry-db migrate --all (one process)   {ours:7.2f} s   runs {', '.join(f'{t:.2f}' for t in ours_runs)}")
    print(f"    psql, offline SQL, 1 transaction/schema   {floor:7.2f} s   runs {', '.join(f'{t:.2f}' for t in floor_runs)}")
    print(f"    51 x alembic -x schema=... upgrade head   {loop:7.2f} s   (once)")
    print(f"    momentry-db / psql floor = {ours / floor:4.2f}x (goal <= 1.5x);"
          f"  alembic loop / momentry-db = {loop / ours:4.1f}x (goal >= 5x)")


def bench_b(b: Bench) -> None:
    print("(b) a no-op migrate at head")
    url = b.fresh_db()
    env = b.env(url, MOMENTRY_EXTRA_ENVS="")
    b.timed([str(BIN / "momentry-db"), "migrate", "--env", "dev"], env)
    ours = b.median([str(BIN / "momentry-db"), "migrate", "--env", "dev"], env, 7)
    ours_pg = b.median([str(BIN / "momentry-db"), "migrate", "--env", "dev", "--store", "postgres"], env, 7)
    bare = b.median([str(BIN / "alembic"), "-x", "schema=dev", "current"], env, 7)
    print(f"    momentry-db migrate --env dev (every store: postgres, qdrant local; mongo unset)  {ours:6.3f} s"
          f"   / alembic current = {ours / bare:4.2f}x  (goal <= 1.3x)")
    print(f"    momentry-db migrate --env dev --store postgres                                  {ours_pg:6.3f} s"
          f"   / alembic current = {ours_pg / bare:4.2f}x")
    print(f"    alembic -x schema=dev current                                                   {bare:6.3f} s")


def bench_c(b: Bench) -> None:
    print("(c) start-up")
    env = b.env("")
    ours = b.median([str(BIN / "momentry-db"), "--help"], env, 15)
    click = b.median([sys.executable, "-c", "import click"], env, 15)
    print(f"    momentry-db --help {ours:6.3f} s   python -c 'import click' {click:6.3f} s   "
          f"ratio = {ours / click:4.2f}x  (goal <= 2x)")


STALL_REVISION = '''"""index frames by timestamp"""
from alembic import op

from momentry_db.revision import on_primary

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_isolated()
    if on_primary():
        upgrade_shared()


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_frames_timestamp_seconds_bench")


def upgrade_isolated() -> None:
{body}


def upgrade_shared() -> None:
    pass
'''
PLAIN = '    op.create_index("ix_frames_timestamp_seconds_bench", "frames", ["timestamp_seconds"])'
CONCURRENT = ('    with op.get_context().autocommit_block():\n'
              '        op.create_index("ix_frames_timestamp_seconds_bench", "frames", ["timestamp_seconds"],\n'
              '                        postgresql_concurrently=True)')


def bench_d(b: Bench) -> None:
    print(f"(d) writer stall while indexing a {ROWS:,}-row isolated table (dev.frames)")
    url = b.fresh_db()
    env = b.env(url, MOMENTRY_EXTRA_ENVS="", MOMENTRY_PG_LOCK_TIMEOUT="0", MOMENTRY_PG_STATEMENT_TIMEOUT="0")
    b.timed([str(BIN / "momentry-db"), "migrate", "--env", "dev", "--store", "postgres"], env)
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute("INSERT INTO dev.videos (source_path) VALUES ('bench.mp4')")
        conn.execute(f"INSERT INTO dev.frames (video_id, frame_number, timestamp_seconds) "
                     f"SELECT 1, g, g / 30.0 FROM generate_series(1, {ROWS}) g")
        conn.execute("VACUUM ANALYZE dev.frames")
    scripts = b.work / "stall-migrations"
    frame_numbers = itertools.count(ROWS + 1)
    results = {}
    for label, body in (("plain", PLAIN), ("concurrent", CONCURRENT)):
        shutil.rmtree(scripts, ignore_errors=True)
        shutil.copytree(REPO / "migrations", scripts, ignore=shutil.ignore_patterns("__pycache__"))
        (scripts / "versions" / "0002_bench.py").write_text(STALL_REVISION.format(body=body))
        b.set_scripts(scripts)
        stalls: list[float] = []
        stop = threading.Event()

        def writer() -> None:
            with psycopg.connect(libpq, autocommit=True) as conn:
                while not stop.is_set():
                    n = next(frame_numbers)
                    started = time.perf_counter()
                    conn.execute("INSERT INTO dev.frames (video_id, frame_number, timestamp_seconds) "
                                 "VALUES (1, %s, %s)", (n, n / 30.0))
                    stalls.append(time.perf_counter() - started)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        elapsed = b.timed([str(BIN / "momentry-db"), "migrate", "--env", "dev", "--store", "postgres"], env)
        time.sleep(0.2)
        stop.set()
        thread.join()
        b.timed([str(BIN / "momentry-db"), "downgrade", "--env", "dev", "--to", "0001"], env)
        results[label] = (max(stalls), elapsed, len(stalls))
        b.set_scripts(REPO / "migrations")
    for label, (stall, elapsed, writes) in results.items():
        print(f"    {label:<10} migration {elapsed:5.2f} s   longest writer stall {stall * 1000:8.1f} ms"
              f"   ({writes} writes)")
    print(f"    goal: concurrent stall < 200 ms -> {results['concurrent'][0] * 1000:.1f} ms")


def main() -> None:
    b = Bench()
    try:
        print(f"momentry-db benchmark on {'the embedded server' if b.server else 'MOMENTRY_BENCH_DATABASE_URL'}, "
              f"{os.cpu_count()} cores")
        for step in (bench_a, bench_b, bench_c, bench_d):
            step(b)
    finally:
        b.close()


if __name__ == "__main__":
    main()
