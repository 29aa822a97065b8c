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

    .venv/bin/python bench/run.py --scale [--sizes 10,50,200,500] [--loop-max 200] [--chart docs/bench-scale.png]
    .venv/bin/python bench/run.py --scale --data-dir /dev/shm   # the embedded server's files in memory

--scale: how cost grows with the number of schemas N (public + N environment schemas, from empty).
    At each N, side by side: `migrate --all` on one connection (also with MOMENTRY_PG_GRANTS=off: the
    same work as the floors, which create no roles) and with `--parallel 2`, a plain
    `alembic upgrade head` (every schema), psql applying the offline SQL (one transaction per
    schema), the wire floor (each schema's offline script sent as one round trip on one connection,
    from this process; and on two connections, public first, the floor `--parallel 2` is held to),
    and the one-process-per-schema `alembic -x schema=... upgrade head` loop (up to --loop-max
    schemas: it takes about a second a schema). Then a no-op `migrate --all` at head. Each size runs
    --rounds interleaved rounds (3) and keeps each method's median. A goal's ratio is the median of
    its per-round ratios, each taken between two measurements made one after the other: the order
    puts each method next to the floor it is held to, and every other round reverses it, so no method
    always goes first and the disk's slow swings fall on both sides of each ratio alike. One size's
    databases (about 9 GB at 500 schemas) are dropped after its last round, and the next size waits
    for the disk to go idle.
    First, once: a no-op `migrate --all` over 30 environments in every store (MongoDB on the
    embedded SecantusDB, Qdrant in local mode) against `alembic current`. Peak memory is each
    child's ru_maxrss (the loop's largest process). Needs matplotlib for the chart
    (`pip install -e '.[bench]'`).

It is a script, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
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


def admin_url(data_dir: Path | None = None) -> tuple[str, object | None]:
    url = os.environ.get("MOMENTRY_BENCH_DATABASE_URL")
    if url:
        return url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="momentry-bench-pg-", dir=data_dir)),
                                 cleanup_mode="delete")
    return server.get_uri(), server


def with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class Bench:
    def __init__(self, data_dir: Path | None = None) -> None:
        self.admin, self.server = admin_url(data_dir)
        self.work = Path(tempfile.mkdtemp(prefix="momentry-bench-"))
        shutil.copy(REPO / "alembic.ini", self.work / "alembic.ini")
        self.set_scripts(REPO / "migrations")
        self.envs = ",".join(f"b{i:02d}" for i in range(1, N_ENVS + 1))
        self.databases: list[str] = []

    def set_scripts(self, scripts: Path) -> None:
        text = (REPO / "alembic.ini").read_text().replace("%(here)s/migrations", str(scripts))
        (self.work / "alembic.ini").write_text(text)

    def fresh_db(self) -> str:
        """A new database, after a checkpoint and a sync: no measurement pays for the writes (or the
        dropped databases) of the one before."""
        name = f"momentry_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        self.settle()
        return with_db(self.admin, name)

    def settle(self) -> None:
        """Flush what earlier measurements left behind: dirty buffers (a checkpoint) and the files of
        dropped databases (their unlinks are written back by the kernel for seconds afterwards)."""
        os.sync()
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        os.sync()

    def quiet(self, limit: float = 120.0) -> None:
        """Wait until tasks have stalled on the disk less than 1% of the last ten seconds
        (``/proc/pressure/io``, "some avg10"), at most ``limit`` seconds: freeing a dropped database's
        files (and discarding their blocks) stalls every fsync for a while, and no measurement should
        pay for it."""
        pressure = Path("/proc/pressure/io")
        os.sync()
        deadline = time.monotonic() + limit
        while pressure.exists() and time.monotonic() < deadline:
            if float(pressure.read_text().split()[1].split("=")[1]) < 1.0:  # "some avg10=..."
                return
            time.sleep(1)

    def env(self, url: str, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MOMENTRY_", "DATABASE_", "MONGODB_",
                                                                           "QDRANT_", "REDIS_"))}
        # PYTHONPATH: the checkout's momentry_db, whatever the venv has installed
        return {**keep, "PYTHONPATH": str(REPO), "DATABASE_URL": url, "MOMENTRY_EXTRA_ENVS": self.envs,
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

    def drop_databases(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.databases.clear()

    def close(self) -> None:
        self.drop_databases()
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
    print(f"    momentry-db migrate --env dev (every store: postgres, qdrant local, mongo embedded) {ours:6.3f} s"
          f"   / alembic current = {ours / bare:4.2f}x  (goal <= 1.3x)")
    print(f"    momentry-db migrate --env dev --store postgres                                    {ours_pg:6.3f} s"
          f"   / alembic current = {ours_pg / bare:4.2f}x")
    print(f"    alembic -x schema=dev current                                                     {bare:6.3f} s")


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
        b.timed([str(BIN / "momentry-db"), "downgrade", "--env", "dev", "--to", "0001", "--yes"], env)
        results[label] = (max(stalls), elapsed, len(stalls))
        b.set_scripts(REPO / "migrations")
    for label, (stall, elapsed, writes) in results.items():
        print(f"    {label:<10} migration {elapsed:5.2f} s   longest writer stall {stall * 1000:8.1f} ms"
              f"   ({writes} writes)")
    print(f"    goal: concurrent stall < 200 ms -> {results['concurrent'][0] * 1000:.1f} ms")


def run_measured(b: Bench, argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a child to completion: (seconds, its peak resident memory in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=b.work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read() if proc.stderr else b""  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{err.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024  # Linux: kilobytes


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def wire_floor(url: str, chunks: list[str], lanes: int = 1) -> float:
    """Each schema's offline script as one round trip: no lock reads, no history. public's first, on one
    connection; the rest on ``lanes`` connections (one thread each) taking scripts from one queue."""
    started = time.perf_counter()
    queue = list(reversed(chunks[1:]))

    def lane(first: str | None) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            if first is not None:
                conn.execute(first.encode())  # no parameters: the simple query protocol, many statements
            while queue:
                try:
                    chunk = queue.pop()
                except IndexError:
                    return
                conn.execute(chunk.encode())

    if lanes == 1:
        lane(chunks[0])
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(chunks[0].encode())
        threads = [threading.Thread(target=lane, args=(None,)) for _ in range(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return time.perf_counter() - started


class Progress:
    """One line per measurement, so a long run shows how far it has got."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def __call__(self, n: int, what: str, seconds: float, mb: float | None = None) -> None:
        self.done += 1
        spent = time.perf_counter() - self.started
        memory = f"  {mb:6.0f} MB" if mb is not None else ""
        print(f"  [{self.done:>3}/{self.total}  {spent / 60:5.1f} min]  N={n:<4} {what:<34} {seconds:8.2f} s{memory}",
              flush=True)


METHODS = {  # key: (label in the table and chart, line style)
    "migrate": ("migrate --all (one connection)", "o-"),
    "nogrants": ("migrate --all, grants off", "o--"),
    "parallel": ("migrate --all --parallel 2", "s-"),
    "psql": ("psql floor (offline SQL)", "^--"),
    "wire": ("wire floor (1 round trip/schema)", "v--"),
    "wire2": ("wire floor, 2 connections", "<--"),
    "alembic": ("alembic upgrade head (every schema)", "*-."),
    "loop": ("alembic -x schema=... loop", "x:"),
    "noop": ("no-op migrate --all", "d-"),
}


NOOP_ENVS = 30
NOOP_ROUNDS = 5


def noop_every_store(b: Bench, progress: Progress) -> tuple[float, float]:
    """A no-op ``migrate --all`` over 30 environments in every store, against ``alembic current`` on the
    same database: medians of interleaved rounds."""
    extras = ",".join(f"e{i:02d}" for i in range(1, NOOP_ENVS - 1))  # prod, dev and 28 more
    env = b.env(b.fresh_db(), MOMENTRY_EXTRA_ENVS=extras)
    seconds, mb = run_measured(b, [str(BIN / "momentry-db"), "migrate", "--all"], env)
    progress(NOOP_ENVS, "migrate --all, every store, from empty", seconds, mb)
    ours, bare = [], []
    for _ in range(NOOP_ROUNDS):
        ours.append(run_measured(b, [str(BIN / "momentry-db"), "migrate", "--all"], env)[0])
        progress(NOOP_ENVS, "no-op migrate --all, every store", ours[-1])
        bare.append(run_measured(b, [str(BIN / "alembic"), "-x", "schema=public", "current"], env)[0])
        progress(NOOP_ENVS, "alembic -x schema=public current", bare[-1])
    return statistics.median(ours), statistics.median(bare)


def bench_scale(b: Bench, sizes: list[int], loop_max: int, chart: Path, rounds: int) -> None:
    times: dict[str, dict[int, float]] = {k: {} for k in METHODS}
    rounds_of: dict[str, dict[int, list[float]]] = {k: {} for k in METHODS}
    memory: dict[str, dict[int, float]] = {k: {} for k in METHODS}
    per_size = {n: 8 * rounds + (n <= loop_max) for n in sizes}
    progress = Progress(sum(per_size.values()) + 3 + 1 + 2 * NOOP_ROUNDS)
    print(f"(scale) public + N schemas from empty, N = {', '.join(map(str, sizes))}; the alembic loop up to "
          f"N = {loop_max}; median of {rounds} interleaved rounds, every other one in reverse order")
    b.quiet()  # whatever ran before the benchmark has finished writing
    idle = b.env(b.fresh_db(), MOMENTRY_EXTRA_ENVS="")
    b.timed([str(BIN / "momentry-db"), "migrate", "--env", "prod", "--store", "postgres"], idle)
    currents = []
    for _ in range(3):
        seconds, _mb = run_measured(b, [str(BIN / "alembic"), "-x", "schema=public", "current"], idle)
        currents.append(seconds)
        progress(1, "alembic -x schema=public current", seconds, _mb)
    current = statistics.median(currents)
    every_store = noop_every_store(b, progress)
    # Every database is kept until the run ends (about 14 GB up to 500 schemas): freeing a dropped
    # database's files stalls the disk's fsyncs for tens of seconds, which no measurement should pay for.
    for n in sizes:
        extras = ",".join(f"s{i:03d}" for i in range(1, n))  # dev and N - 1 extras: N schemas beside public
        offline = subprocess.run([str(BIN / "alembic"), "upgrade", "head", "--sql"], cwd=b.work,
                                 env=b.env("", MOMENTRY_EXTRA_ENVS=extras), capture_output=True, text=True,
                                 check=True).stdout
        script = b.work / f"all-{n}.sql"
        script.write_text(offline)
        chunks = [c + "COMMIT;" for c in offline.split("\nCOMMIT;") if "BEGIN;" in c]
        assert len(chunks) == n + 1, (len(chunks), n)
        runs: dict[str, list[tuple[float, float | None]]] = {k: [] for k in METHODS}
        migrate = [str(BIN / "momentry-db"), "migrate", "--all", "--store", "postgres"]

        def measure(key: str) -> None:
            url = b.fresh_db()
            env = b.env(url, MOMENTRY_EXTRA_ENVS=extras)
            if key in ("wire", "wire2"):
                runs[key].append((wire_floor(libpq(url), chunks, lanes=2 if key == "wire2" else 1), None))
            elif key == "psql":
                runs[key].append(run_measured(b, [pg_bin("psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script),
                                                  libpq(url)], b.env(url)))
            elif key == "alembic":
                runs[key].append(run_measured(b, [str(BIN / "alembic"), "upgrade", "head"], env))
            elif key == "parallel":
                runs[key].append(run_measured(b, [*migrate, "--parallel", "2"], env))
            elif key == "nogrants":
                runs[key].append(run_measured(b, migrate, {**env, "MOMENTRY_PG_GRANTS": "off"}))
            else:  # migrate, then the no-op on the same database
                runs[key].append(run_measured(b, migrate, env))
                progress(n, METHODS[key][0], *runs[key][-1])
                b.settle()
                runs["noop"].append(run_measured(b, migrate, env))
                key = "noop"
            progress(n, METHODS[key][0], *runs[key][-1])

        # each method beside the floor it is held to; every other round reversed: no method always goes first
        order = ["alembic", "psql", "migrate", "wire", "parallel", "wire2", "nogrants"]
        for r in range(rounds):
            for key in order if r % 2 == 0 else order[::-1]:
                measure(key)
        if n <= loop_max:
            url = b.fresh_db()
            env = b.env(url, MOMENTRY_EXTRA_ENVS=extras)
            loop, peak = 0.0, 0.0
            for schema in ["public", "dev"] + [f"s{i:03d}" for i in range(1, n)]:
                seconds, mb = run_measured(b, [str(BIN / "alembic"), "-x", f"schema={schema}", "upgrade", "head"], env)
                loop, peak = loop + seconds, max(peak, mb)
            runs["loop"].append((loop, peak))
            progress(n, f"{METHODS['loop'][0]} ({n + 1} processes)", loop, peak)
        for key, measured in runs.items():
            rounds_of[key][n] = [t for t, _ in measured]
            if measured:
                times[key][n] = statistics.median(t for t, _ in measured)
                if measured[0][1] is not None:
                    memory[key][n] = max(m for _, m in measured if m is not None)
    print()
    print("    N     " + "".join(f"{k:>10}" for k in METHODS) + "   (seconds; peak MB of migrate --all)")
    for n in sizes:
        print(f"    {n:<5} " + "".join(f"{times[k][n]:10.2f}" if n in times[k] else f"{'-':>10}" for k in METHODS)
              + f"   {memory['migrate'][n]:.0f} MB")
    print(f"    alembic -x schema=public current: {current:.3f} s")
    print()
    big = max(sizes)
    hundred = [n for n in sizes if n >= 100] or [big]

    def ratio(a: str, c: str, n: int) -> float:
        return times[a][n] / times[c][n]

    def paired(a: str, c: str, n: int) -> str:
        """The median of the per-round ratios (two measurements one after the other), then the ratio of
        the medians and each round's."""
        each = [x / y for x, y in zip(rounds_of[a][n], rounds_of[c][n])]
        return (f"{statistics.median(each):.2f}x (ratio of medians {ratio(a, c, n):.2f}x; rounds "
                f"{', '.join(f'{x:.2f}' for x in each)})")

    print("    goals (the median of each round's ratio of two measurements made one after the other):")
    print(f"    migrate --all / psql floor, N={big}: {ratio('migrate', 'psql', big):.2f}x  (goal <= 1.5x)")
    print(f"    migrate --all / wire floor, N={big}: {paired('migrate', 'wire', big)}  (goal <= 1.15x, issue 13 #1); "
          f"with grants off (the floor's own work): {ratio('nogrants', 'wire', big):.2f}x")
    for n in hundred:
        print(f"    migrate --all --parallel 2 / single-connection wire floor, N={n}: "
              f"{paired('parallel', 'wire', n)}  (goal <= 0.8x, issue 13 #1b); / psql floor "
              f"{ratio('parallel', 'psql', n):.2f}x; / migrate --all {ratio('parallel', 'migrate', n):.2f}x; "
              f"the wire floor on 2 connections itself: {ratio('wire2', 'wire', n):.2f}x")
    fifty = min(sizes, key=lambda n: abs(n - 50))
    print(f"    alembic upgrade head (every schema) / psql floor, N={fifty}: {paired('alembic', 'psql', fifty)}  "
          "(goal <= 1.5x, issue 13 #3)")
    ours, bare = every_store
    print(f"    no-op migrate --all over {NOOP_ENVS} environments, every store (PostgreSQL, MongoDB on the embedded "
          f"SecantusDB, Qdrant local mode) / alembic current: {ours:.2f} s / {bare:.2f} s = {ours / bare:.2f}x  "
          "(goal <= 1.5x, issue 13 #2)")
    for n in sorted(times["loop"]):
        print(f"    alembic loop / migrate --all, N={n}: {ratio('loop', 'migrate', n):.1f}x slower  (goal >= 5x)")
    for n in sizes:
        print(f"    no-op migrate --all over {n + 1} schemas / one alembic current: {times['noop'][n] / current:.2f}x")
    draw(chart, sizes, times, memory, load=os.getloadavg())


def draw(chart: Path, sizes: list[int], times: dict[str, dict[int, float]], memory: dict[str, dict[int, float]],
         load: tuple[float, float, float]) -> None:
    """Time against schemas, one line per method; peak memory on a second panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("    no chart: matplotlib is missing (pip install -e '.[bench]')")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for key, (name, style) in METHODS.items():
        if times[key]:
            xs = sorted(times[key])
            left.plot(xs, [times[key][x] for x in xs], style, label=name)
        if memory[key]:
            xs = sorted(memory[key])
            right.plot(xs, [memory[key][x] for x in xs], style, label=name)
    left.set(xscale="log", yscale="log", xlabel="environment schemas (besides public)", ylabel="seconds",
             title="time from empty to head")
    right.set(xscale="log", xlabel="environment schemas (besides public)", ylabel="peak RSS (MB)",
              title="peak memory per process")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    for ax in (left, right):
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"momentry-db bench/run.py --scale, {os.cpu_count()} cores, "
                 f"load average {load[0]:.1f} at the end", fontsize=10)
    fig.tight_layout()
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(chart, dpi=110)
    print(f"    chart: {chart}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="how cost grows with the number of schemas")
    parser.add_argument("--sizes", default="10,50,200,500", help="schemas besides public, comma-separated")
    parser.add_argument("--loop-max", type=int, default=200,
                        help="largest N at which the one-process-per-schema alembic loop runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at each N (the median is kept)")
    parser.add_argument("--chart", type=Path, default=REPO / "docs" / "bench-scale.png")
    parser.add_argument("--data-dir", type=Path, help="where the embedded server keeps its files (default: a temporary "
                        "directory); /dev/shm keeps them in memory, which takes the disk out of the figures")
    args = parser.parse_args()
    if args.data_dir and os.environ.get("MOMENTRY_BENCH_DATABASE_URL"):
        parser.error("--data-dir is for the embedded server; MOMENTRY_BENCH_DATABASE_URL names another")
    b = Bench(args.data_dir)
    try:
        where = f"the embedded server in {args.data_dir or 'a temporary directory'}" if b.server else \
            "MOMENTRY_BENCH_DATABASE_URL"
        print(f"momentry-db benchmark on {where}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.scale:
            bench_scale(b, sorted(int(n) for n in args.sizes.split(",")), args.loop_max, args.chart, args.rounds)
        else:
            for step in (bench_a, bench_b, bench_c, bench_d):
                step(b)
    finally:
        b.close()


if __name__ == "__main__":
    main()
