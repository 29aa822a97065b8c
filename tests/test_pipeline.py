"""Release-pipeline safety: concurrency, crash recovery, drift, lint, consent, history, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from momentry_db import command
from momentry_db.errors import RefusedError
from momentry_db.settings import load_project
from momentry_db.stores.postgres import LOCK_CLASS
from momentry_db.tables import BOOKKEEPING_TABLES
from tests.helpers import plant, wait_until

GATE = 7_341_002  # an advisory lock key a planted revision waits on while the test holds it

def no_ansi(*texts: str) -> None:
    assert all("\x1b[" not in t for t in texts)


def test_eight_concurrent_migrations_end_at_head_applying_each_step_once(project, database) -> None:
    def run(_: int):
        return project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev", "--json",
                                   "--lock-timeout", "120")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert [r.code for r in results] == [0] * 8, [r.err for r in results]
    applied = sorted((s["store"], s["name"]) for r in results for s in json.loads(r.out)["applied"])
    assert applied == [("postgres", "0001"), ("qdrant", "create")]
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]
    assert database.query("SELECT count(*) FROM dev.momentry_history WHERE outcome = 'applied'") == [(1,)]


def test_sigkill_mid_revision_leaves_the_schema_before_it_and_a_rerun_converges(project, database,
                                                                                 tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    # The revision waits, after its first change, on a lock the test holds: the run is killed there.
    plant(project, tmp_path, 'op.add_column("videos", sa.Column("note", sa.Text()))\n'
                             f'op.execute("SELECT pg_advisory_xact_lock({GATE})")', doc="slow note")
    with psycopg.connect(database.url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        proc = subprocess.Popen([sys.executable, "-m", "momentry_db.cli", "--project-dir", str(project.root),
                                 "migrate", "--env", "dev", "--store", "postgres"],
                                env={**os.environ, **project.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: proc.poll() is not None or database.query(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s AND objsubid = 1 "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", (GATE,)),
                "the slow revision to start")
            assert proc.poll() is None, proc.communicate()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        columns = {r[0] for r in database.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'dev' AND table_name = 'videos'")}
        assert "note" not in columns
        assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]
    # The killed run's server session ends once it finds its client gone, which frees the schema's lock.

    rerun = project.cli("migrate", "--env", "dev", "--store", "postgres", "--lock-timeout", "60")
    assert rerun.code == 0, rerun.err
    assert "upgraded to 0002 slow note" in rerun.out
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0002",)]


def test_check_exit_codes_before_after_and_with_drift(project, database) -> None:
    before = project.cli("check", "--env", "dev")
    assert before.code == 1
    assert "pending: postgres dev (dev): 0001 initial schema" in before.out
    assert project.cli("migrate", "--env", "dev").code == 0
    after = project.cli("check", "--env", "dev")
    assert after.code == 0, after.out
    assert "every store at head, no drift" in after.out
    database.execute("ALTER TABLE dev.frames ADD COLUMN hand_made text")
    drift = project.cli("check", "--env", "dev", "--json")
    assert drift.code == 1
    body = json.loads(drift.out)
    assert body["ok"] is False and body["pending"] == []
    assert any("unexpected column frames.hand_made" in d for d in body["drift"])


SECRETS = {"pg": "pgPassw0rd-xyz", "mongo": "m0ngoPass-xyz", "redis": "r3disPass-xyz", "qdrant": "qdrantKey-xyz"}


PG_MASKED = "postgresql+psycopg://app:***@127.0.0.1:1/momentry"
MONGO_MASKED = "mongodb://app:***@127.0.0.1:"


@pytest.mark.parametrize("args, code, shown", [
    (["migrate", "--env", "dev"], 2, f"error: postgres: cannot connect to {PG_MASKED}: "),
    (["migrate", "--env", "dev", "--store", "mongo"], 1, f"error: mongo: cannot reach {MONGO_MASKED}"),
    (["migrate", "--env", "dev", "--store", "qdrant"], 1, "qdrant: warning: QDRANT_API_KEY is sent over plain http"),
    (["status", "--env", "dev", "--json"], 2, f"cannot connect to {PG_MASKED}: "),
    (["check", "--env", "dev"], 2, f"error: postgres: cannot connect to {PG_MASKED}: "),
    (["verify", "--env", "dev", "--json"], 1, f"mongo: cannot reach {MONGO_MASKED}"),
    (["envs"], 0, f"db {PG_MASKED}"),
    (["envs", "--json"], 0, f'"database_url": "{PG_MASKED}"'),
    (["migrate", "--env", "nope"], 2, "error: unknown environment 'nope'; known: prod, dev"),
    (["history", "--env", "dev"], 2, f"error: postgres: cannot connect to {PG_MASKED}: "),
])
def test_secrets_never_appear_in_output(project, silent_server, args: list[str], code: int, shown: str) -> None:
    port, _ = silent_server
    env = {
        "DATABASE_URL": f"postgresql://app:{SECRETS['pg']}@127.0.0.1:1/momentry",
        "MONGODB_URL": f"mongodb://app:{SECRETS['mongo']}@127.0.0.1:{port}/?directConnection=true",
        "REDIS_URL": f"redis://:{SECRETS['redis']}@127.0.0.1:1/0",
        "QDRANT_URL": f"http://127.0.0.1:{port}",
        "QDRANT_API_KEY": SECRETS["qdrant"],
    }
    result = project.momentry_db("--project-dir", str(project.root), *args, env=env)
    output = result.out + result.err
    assert result.code == code, output
    assert shown in output, output
    for secret in SECRETS.values():
        assert secret not in output, (args, output)
    assert "Traceback" not in output
    no_ansi(output)


def test_lint_catches_a_planted_unsafe_revision(project, database, tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    plant(project, tmp_path, """
op.create_index("ix_videos_title", "videos", ["title"])
op.add_column("videos", sa.Column("must", sa.Text(), nullable=False))
op.alter_column("videos", "width", type_=sa.BigInteger())
op.drop_column("videos", "codec")
op.drop_table("file_lifecycle")
""", doc="unsafe")
    result = project.cli("lint", "--env", "prod", "--json")
    assert result.code == 1
    risks = {f["risk"] for f in json.loads(result.out)["findings"]}
    assert {"non-concurrent index on an existing table", "NOT NULL column without a default",
            "column type change", "dropped column", "dropped table"} <= risks
    text = project.cli("lint", "--env", "prod")
    assert "non-concurrent index on an existing table [require-concurrent-index-creation]" in text.out


def test_the_initial_revision_lints_clean(project) -> None:
    result = project.cli("lint", "--env", "prod")
    assert result.code == 0, result.out
    assert "lint prod: 1 pending revision(s), 0 risky statement(s)" in result.out


def test_risky_prod_migrations_need_consent(project, database, tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    plant(project, tmp_path, 'op.create_index("ix_videos_title", "videos", ["title"])', doc="index title")
    refused = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "prod")
    assert refused.code == 2
    assert "lint found 1 risky statement(s)" in refused.err and "--accept-risky" in refused.err
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]
    dev = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev")
    assert dev.code == 0, dev.err  # dev needs no consent
    accepted = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "prod", "--accept-risky")
    assert accepted.code == 0, accepted.err
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0002",)]


def test_library_callers_get_the_same_refusal(project, database, tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    plant(project, tmp_path, 'op.drop_column("videos", "codec")', doc="drop codec")
    lib = load_project(project.root, project.environ)
    with pytest.raises(RefusedError, match="dropped column"):
        command.migrate(lib, "prod", stores=["postgres"])
    command.migrate(lib, "prod", stores=["postgres"], consent=lambda question: "dropped column" in question)
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0002",)]


def test_downgrade_of_prod_needs_consent(project, database) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    refused = project.momentry_db("--project-dir", str(project.root), "downgrade", "--env", "prod", "--to", "base")
    assert refused.code == 2 and "needs explicit consent" in refused.err
    assert "videos" in database.tables("public")
    assert project.cli("migrate", "--env", "dev").code == 0
    dev = project.momentry_db("--project-dir", str(project.root), "downgrade", "--env", "dev", "--to", "base")
    assert dev.code == 0, dev.err
    assert "videos" not in database.tables("dev") and "videos" in database.tables("public")
    forced = project.momentry_db("--project-dir", str(project.root), "downgrade", "--env", "prod", "--to", "base",
                                 "--yes")
    assert forced.code == 0 and "videos" not in database.tables("public")


def test_a_held_schema_lock_times_out_naming_its_holder(project, database) -> None:
    with psycopg.connect(database.url, autocommit=True, application_name="nightly-batch") as blocker:
        blocker.execute("SELECT pg_advisory_lock(%s, hashtext('dev'))", (LOCK_CLASS,))
        result = project.cli("migrate", "--env", "dev", "--store", "postgres", "--lock-timeout", "1")
        assert result.code == 1
        assert "migration lock held by nightly-batch (pid" in result.err
        assert "for over 1s; retry when it finishes" in result.err  # it gave up after the --lock-timeout given
    assert "dev" not in {r[0] for r in database.query("SELECT nspname FROM pg_namespace")}
    other = project.cli("migrate", "--env", "prod", "--store", "postgres", "--lock-timeout", "1")
    assert other.code == 0  # another schema never waits on dev's lock


def test_migration_sessions_run_with_a_lock_timeout(project, database, tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    plant(project, tmp_path, 'op.add_column("videos", sa.Column("note", sa.Text()))', doc="video note")
    executed: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        executed.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        with psycopg.connect(database.url) as holder:
            holder.execute("LOCK TABLE dev.videos IN ACCESS SHARE MODE")  # a long read, as the app might hold
            result = project.cli("migrate", "--env", "dev", "--store", "postgres", "--pg-lock-timeout", "300ms")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert result.code == 1
    assert "revision 0002 (video note) failed: canceling statement due to lock timeout" in result.err
    # the session ran with the lock_timeout given, set before the revision's statement that timed out
    (alter,) = [i for i, s in enumerate(executed) if s.startswith("ALTER TABLE") and "note" in s]
    assert [s for s in executed[:alter] if s.startswith("SET lock_timeout")] == ["SET lock_timeout = '300ms'"]
    offline = project.cli("plan", "--env", "dev", "--store", "postgres", "--json")
    sql = json.loads(offline.out)["targets"][0]["sql"]
    assert "SET lock_timeout = '5s';" in sql and "SET statement_timeout = '30min';" in sql


def test_history_records_applied_and_failed_steps(project, database, tmp_path: Path) -> None:
    assert project.cli("migrate", "--env", "dev").code == 0
    plant(project, tmp_path, 'op.execute("SELECT no_such_function()")', doc="broken")
    failed = project.cli("migrate", "--env", "dev")
    assert failed.code == 1
    assert failed.err.startswith("error: postgres dev (schema dev): revision 0002 (broken) failed:")
    result = project.cli("history", "--env", "dev", "--json")
    assert result.code == 0
    entries = json.loads(result.out)["history"]
    outcomes = [(e["store"], e["step"], e["outcome"]) for e in entries]
    assert ("postgres", "0001", "applied") in outcomes
    assert ("qdrant", "create", "applied") in outcomes
    assert any(store == "postgres" and outcome == "failed" and "0002" in step for store, step, outcome in outcomes)
    assert all({"recorded_at", "env", "store", "step", "duration_ms", "outcome"} <= set(e) for e in entries)
    assert all(e["env"] == "dev" for e in entries)
    text = project.cli("history", "--env", "dev")
    assert "postgres 0001  applied in" in text.out


def test_a_failure_in_one_store_stops_the_run_and_keeps_what_earlier_stores_applied(project, database) -> None:
    from qdrant_client import QdrantClient, models

    from momentry_db.stores import qdrant

    (spec,) = qdrant.load_specs()
    squatter = qdrant.physical_name("momentry_dev_rule1", spec)
    path = str(Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant")
    client = QdrantClient(path=path)  # a leftover collection where the new one must go
    client.create_collection(squatter, vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    client.close()

    failed = project.cli("migrate", "--env", "dev")
    assert failed.code == 1
    assert failed.err.strip().splitlines()[-1].startswith(
        f"error: qdrant dev (collection momentry_dev_rule1): create {squatter} failed:")
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]  # postgres stays

    client = QdrantClient(path=path)
    client.delete_collection(squatter)
    client.close()
    rerun = project.cli("migrate", "--env", "dev", "--json")
    assert rerun.code == 0
    assert [(s["store"], s["name"]) for s in json.loads(rerun.out)["applied"]] == [("qdrant", "create")]


@pytest.mark.parametrize("revision", ["nonsense", "head"])
def test_downgrade_to_an_unknown_revision_is_bad_input(project, database, revision: str) -> None:
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    result = project.cli("downgrade", "--env", "dev", "--to", revision)
    assert result.code == 2
    assert database.query("SELECT count(*) FROM dev.momentry_history") == [(1,)]  # nothing recorded


def test_downgrade_and_stamp_say_what_they_did(project, database) -> None:
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    down = project.cli("downgrade", "--env", "dev", "--to", "base")
    assert "postgres dev (schema dev): downgraded 0001" in down.out and "upgraded" not in down.out
    rows = database.query("SELECT direction, outcome FROM dev.momentry_history ORDER BY id")
    assert rows == [("upgrade", "applied"), ("downgrade", "applied")]


def _rows(database, schema: str) -> list[tuple]:
    return database.query(f"SELECT source_path FROM {schema}.videos ORDER BY source_path")


def test_downgrade_of_an_environment_whose_tables_hold_rows_needs_consent(project, database) -> None:
    assert project.cli("migrate", "--env", "dev").code == 0
    database.execute("INSERT INTO dev.videos (source_path) VALUES ('kept.mp4')")

    refused = project.cli("downgrade", "--env", "dev", "--to", "base")

    assert refused.code == 2
    assert refused.err.strip().splitlines() == [
        "error: downgrade of dev (schema dev) may drop tables holding rows (videos); confirm on a terminal, "
        "or pass --yes; nothing was changed"]
    assert _rows(database, "dev") == [("kept.mp4",)]
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]
    confirmed = project.cli("downgrade", "--env", "dev", "--to", "base", "--yes")
    assert confirmed.code == 0, confirmed.err
    assert database.tables("dev") == BOOKKEEPING_TABLES


def test_plain_alembic_downgrade_never_fans_out_and_needs_confirm_where_rows_would_go(project, database) -> None:
    assert project.alembic("upgrade", "head").code == 0
    database.execute("INSERT INTO public.videos (source_path) VALUES ('prod.mp4')")
    database.execute("INSERT INTO dev.videos (source_path) VALUES ('dev.mp4')")
    public_before = database.dump_schema("public")

    everywhere = project.alembic("downgrade", "base")
    public = project.alembic("-x", "schema=public", "downgrade", "base")
    dev = project.alembic("-x", "schema=dev", "downgrade", "base")
    wrong = project.alembic("-x", "schema=dev", "-x", "confirm=public", "downgrade", "base")

    assert [r.code for r in (everywhere, public, dev, wrong)] == [2, 2, 2, 2]
    assert everywhere.err.strip().splitlines()[-1] == (
        "error: alembic downgrade runs on one schema: name it with -x schema=NAME (and -x confirm=NAME where "
        "tables hold rows, and for public)")
    assert public.err.strip().splitlines()[-1] == (
        "error: alembic downgrade of schema public may drop data; tables holding rows: videos; "
        "add -x confirm=public to go ahead; nothing was changed")
    assert dev.err.strip().splitlines()[-1] == (
        "error: alembic downgrade of schema dev may drop data; tables holding rows: videos; "
        "add -x confirm=dev to go ahead; nothing was changed")
    assert database.dump_schema("public") == public_before
    assert (_rows(database, "public"), _rows(database, "dev")) == ([("prod.mp4",)], [("dev.mp4",)])

    confirmed = project.alembic("-x", "schema=dev", "-x", "confirm=dev", "downgrade", "base")
    assert confirmed.code == 0, confirmed.err
    assert database.tables("dev") == BOOKKEEPING_TABLES
    assert database.dump_schema("public") == public_before
