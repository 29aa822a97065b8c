"""Many environments in one run, online DDL, and a light start-up."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import psycopg

from momentry_db.stores import postgres
from momentry_db.tables import BOOKKEEPING_TABLES, isolated_tables
from tests.helpers import count_mongo_clients, local_qdrant, plant

EXTRA = "pr-1,pr-2,pr-3,staging"
SCHEMAS = ["pr_1", "pr_2", "pr_3", "staging"]


@pytest.fixture
def many(project):
    project.environ["MOMENTRY_EXTRA_ENVS"] = EXTRA
    return project


def outcomes(result) -> dict[tuple[str, str], str]:
    return {(t["store"], t["target"]): t["outcome"] for t in json.loads(result.out)["targets"]}


def test_all_environments_public_first_then_nothing_pending(many, database) -> None:
    first = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert first.code == 0, first.err
    body = json.loads(first.out)
    assert [t["target"] for t in body["targets"]] == ["public", "dev", *SCHEMAS]
    assert all(t["outcome"] == "upgraded" and t["applied"] == ["0001"] for t in body["targets"])
    for schema in ["dev", *SCHEMAS]:
        assert database.tables(schema) == isolated_tables() | BOOKKEEPING_TABLES
        assert database.query(f"SELECT step, outcome, duration_ms IS NOT NULL FROM {schema}.momentry_history") == [
            ("0001", "applied", True)]
    again = many.cli("migrate", "--all", "--store", "postgres")
    assert again.code == 0
    assert "done: 6 environment(s), 6 target(s): 0 upgraded, 6 up to date, 0 failed" in again.out


def test_compiled_schemas_match_public_exactly(many, database) -> None:
    assert many.cli("migrate", "--all", "--store", "postgres").code == 0
    for env in ("pr-1", "staging"):
        result = many.cli("verify", "--env", env, "--store", "postgres")
        assert result.code == 0, result.out
    check = many.cli("check", "--env", "pr-2", "--store", "postgres")
    assert check.code == 0, check.out


def test_repeated_env_options_migrate_only_those(many, database) -> None:
    result = many.cli("migrate", "--env", "pr-2", "--env", "dev", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert set(outcomes(result)) == {("postgres", "dev"), ("postgres", "pr_2")}
    assert database.tables("pr_1") == set()


def test_a_failing_target_is_named_and_the_others_finish(many, database) -> None:
    # A sequence, not a model table: the schema is not "unmanaged", and revision 0001 fails on it.
    database.execute("CREATE SCHEMA pr_2; CREATE SEQUENCE pr_2.videos START 7")
    result = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 1
    states = outcomes(result)
    assert states.pop(("postgres", "pr_2")) == "failed"
    assert set(states.values()) == {"upgraded"}
    failure = next(t for t in json.loads(result.out)["targets"] if t["target"] == "pr_2")
    assert failure["error"].startswith("postgres pr-2 (schema pr_2): revision 0001 (initial schema) failed:")
    assert 'relation "videos" already exists' in failure["error"]
    assert database.tables("pr_2") == set()  # nothing half-applied, not even the bookkeeping
    assert database.query("SELECT last_value FROM pr_2.videos") == [(7,)]
    text = many.cli("migrate", "--all", "--store", "postgres")
    assert "postgres pr-2 (schema pr_2): failed: postgres pr-2 (schema pr_2): revision 0001" in text.out


def test_parallel_workers_reach_the_same_end(many, database, tmp_path: Path) -> None:
    assert many.cli("migrate", "--env", "prod", "--store", "postgres").code == 0
    # An autocommit revision cannot be compiled: every schema goes through Alembic, two at a time.
    plant(many, tmp_path, """
with op.get_context().autocommit_block():
    op.create_index("ix_videos_title", "videos", ["title"], postgresql_concurrently=True)
""", doc="title index concurrently")
    result = many.cli("migrate", "--all", "--store", "postgres", "--parallel", "2", "--json")
    assert result.code == 0, result.err
    assert set(outcomes(result).values()) == {"upgraded"}
    for schema in ["public", "dev", *SCHEMAS]:
        assert database.query("SELECT version_num FROM {}.alembic_version".format(schema)) == [("0002",)]


def test_concurrent_index_in_every_schema_on_a_table_with_rows(project, database, tmp_path: Path) -> None:
    for env in ("prod", "dev"):
        assert project.cli("migrate", "--env", env, "--store", "postgres").code == 0
    for schema in ("public", "dev"):
        database.execute(f"INSERT INTO {schema}.videos (source_path, title) "
                         f"SELECT 'v' || g || '.mp4', 'title ' || (g % 97) FROM generate_series(1, 20000) g")
    plant(project, tmp_path, """
with op.get_context().autocommit_block():
    op.create_index("ix_videos_title", "videos", ["title"], postgresql_concurrently=True)
""", doc="title index concurrently")
    for env in ("prod", "dev"):
        result = project.cli("migrate", "--env", env, "--store", "postgres")
        assert result.code == 0, result.err
    valid = database.query("SELECT n.nspname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                           "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'ix_videos_title'")
    assert sorted(valid) == [("dev", True), ("public", True)]
    offline = project.cli("plan", "--env", "dev", "--store", "postgres")  # nothing pending now
    assert "nothing to do" in offline.out


def _imports(project, *args: str) -> set[str]:
    """The top-level packages a real run of momentry-db imports."""
    return {name.split(".")[0] for name in _modules(project, *args)}


@pytest.mark.parametrize("args", [["--help"], ["status", "--env", "dev", "--store", "postgres"]])
def test_start_up_imports_no_mongo_or_qdrant_client(project, args: list[str]) -> None:
    imported = _imports(project, *args)
    assert "click" in imported
    assert not imported & {"pymongo", "qdrant_client", "redis", "bson", "grpc", "httpx"}
    if args == ["--help"]:
        assert not imported & {"sqlalchemy", "alembic", "psycopg"}


# --- one target's failure never stops the others ----------------------------------------------

ALL = ["prod", "dev", "pr-1", "pr-2", "pr-3"]
PG = {"prod": "public", "dev": "dev", "pr-1": "pr_1", "pr-2": "pr_2", "pr-3": "pr_3"}
MONGO_STEPS = ["0001_chunks", "0002_cache"]
QDRANT_STEPS = ["create"]


@pytest.fixture
def three(project, fresh_mongo_url):
    """prod, dev and pr-1..3, with MongoDB on a real server and Qdrant in local mode."""
    project.environ["MOMENTRY_EXTRA_ENVS"] = "pr-1,pr-2,pr-3"
    project.environ["MONGODB_URL"] = fresh_mongo_url
    return project


@contextmanager
def held_lock(database, schema: str) -> Iterator[None]:
    """Hold a schema's migration lock from another session, the way a concurrent momentry-db run does."""
    with psycopg.connect(database.url, autocommit=True, application_name="other-run") as conn:
        conn.execute(postgres.lock_sql(schema, xact=False))
        yield


def expected(postgres_outcomes: dict[str, tuple[str, list[str]]], stores=("postgres", "mongo", "qdrant"),
             ) -> list[tuple[str, str, str, str, list[str]]]:
    """Every target's (store, env, target, outcome, applied) in report order: store, then environment.

    PostgreSQL targets not named upgrade to 0001; MongoDB and Qdrant targets apply their first steps.
    """
    rows = []
    for store in stores:
        for env in ALL:
            suffix = "" if env == "prod" else "_" + env.replace("-", "_")
            target = {"postgres": PG[env], "mongo": f"momentry{suffix}", "qdrant": f"momentry{suffix}_rule1"}[store]
            default = {"postgres": ["0001"], "mongo": MONGO_STEPS, "qdrant": QDRANT_STEPS}[store]
            outcome = postgres_outcomes.get(env, ("upgraded", default)) if store == "postgres" else ("upgraded", default)
            rows.append((store, env, target, *outcome))
    return rows


def rows(result) -> list[tuple[str, str, str, str, list[str]]]:
    return [(t["store"], t["env"], t["target"], t["outcome"], t["applied"]) for t in json.loads(result.out)["targets"]]


def errors(result) -> dict[tuple[str, str], str]:
    return {(t["store"], t["env"]): t["error"] for t in json.loads(result.out)["targets"] if t["error"]}


@pytest.mark.parametrize("locked", ["pr-3", "dev"])
def test_a_held_lock_fails_only_its_own_target_in_every_store(three, database, locked: str) -> None:
    schema = PG[locked]
    with held_lock(database, schema):
        result = three.cli("migrate", "--all", "--lock-timeout", "0.5", "--json")
        assert result.code == 1, result.err
        body = json.loads(result.out)
        assert body["ok"] is False
        assert rows(result) == expected({locked: ("failed", [])})
        assert list(errors(result)) == [("postgres", locked)]
        assert errors(result)[("postgres", locked)].startswith(
            f"postgres {locked} (schema {schema}): migration lock held by other-run (pid ")
        assert body["summary"] == {"upgraded": 14, "up to date": 0, "failed": 1, "refused": 0}
        assert database.tables(schema) == set()  # nothing written behind the lock
        for env in ALL:
            if env != locked:
                assert database.query(f"SELECT version_num FROM {PG[env]}.alembic_version") == [("0001",)]

        again = three.cli("migrate", "--all", "--lock-timeout", "0.5")  # the text report lists every target
    assert again.code == 1
    lines = again.out.splitlines()
    assert len(lines) == 16
    for line, (store, env, target, _, _) in zip(lines, expected({})):
        if (store, env) == ("postgres", locked):
            assert line.startswith(f"postgres {locked} (schema {schema}): failed: postgres {locked} (schema {schema}): "
                                   "migration lock held by other-run (pid ")
        else:
            kind = {"postgres": "schema", "mongo": "database", "qdrant": "collection"}[store]
            assert line.startswith(f"{store} {env} ({kind} {target}): up to date (at ")
    assert lines[-1] == "done: 5 environment(s), 15 target(s): 0 upgraded, 14 up to date, 1 failed"


_real_upgrade_chunk = postgres.upgrade_chunk


def dying_chunk(envs, script_location, lock_wait):
    """A worker whose share includes pr-2 dies with an unexpected error; the others run as usual."""
    if any(env.name == "pr-2" for env in envs):
        raise RuntimeError("worker lost")
    return _real_upgrade_chunk(envs, script_location, lock_wait)


def test_parallel_workers_report_a_held_lock_and_a_dead_worker_as_their_targets_outcomes(
        three, database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert three.cli("migrate", "--env", "prod", "--store", "postgres").code == 0
    # An autocommit revision cannot be compiled: every schema goes through the workers, two at a time
    # ([dev, pr-2] and [pr-1, pr-3]).
    plant(three, tmp_path, """
with op.get_context().autocommit_block():
    op.create_index("ix_videos_title", "videos", ["title"], postgresql_concurrently=True)
""", doc="title index concurrently")
    monkeypatch.setattr(postgres, "upgrade_chunk", dying_chunk)
    with held_lock(database, "pr_1"):
        result = three.cli("migrate", "--all", "--parallel", "2", "--lock-timeout", "0.5", "--json")
    assert result.code == 1, result.err
    assert rows(result) == expected({"prod": ("upgraded", ["0002"]), "dev": ("failed", []), "pr-1": ("failed", []),
                                     "pr-2": ("failed", []), "pr-3": ("upgraded", ["0001", "0002"])})
    failures = errors(result)
    assert failures[("postgres", "dev")] == "postgres dev (schema dev): upgrade failed: unexpected RuntimeError: worker lost"
    assert failures[("postgres", "pr-2")] == "postgres pr-2 (schema pr_2): upgrade failed: unexpected RuntimeError: worker lost"
    assert failures[("postgres", "pr-1")].startswith("postgres pr-1 (schema pr_1): migration lock held by other-run")
    assert len(failures) == 3
    for schema in ("dev", "pr_1", "pr_2"):
        assert database.tables(schema) == set()
    assert database.query("SELECT version_num FROM pr_3.alembic_version") == [("0002",)]


def test_a_failing_revision_in_one_schema_stops_nothing_else_in_any_store(three, database) -> None:
    database.execute("CREATE SCHEMA pr_2; CREATE SEQUENCE pr_2.videos START 7")
    result = three.cli("migrate", "--all", "--json")
    assert result.code == 1, result.err
    assert rows(result) == expected({"pr-2": ("failed", [])})
    assert list(errors(result)) == [("postgres", "pr-2")]
    assert errors(result)[("postgres", "pr-2")].startswith(
        "postgres pr-2 (schema pr_2): revision 0001 (initial schema) failed: ")
    assert database.tables("pr_2") == set()
    assert database.query("SELECT last_value FROM pr_2.videos") == [(7,)]


def test_unmanaged_tables_refuse_their_own_schema_in_a_fan_out_as_in_a_run_over_it_alone(three, database) -> None:
    database.execute("CREATE SCHEMA pr_2; CREATE TABLE pr_2.videos (id int); INSERT INTO pr_2.videos VALUES (7)")
    result = three.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 1, result.err
    assert rows(result) == expected({"pr-2": ("refused", [])}, stores=("postgres",))
    assert "momentry-db adopt --env pr-2" in errors(result)[("postgres", "pr-2")]
    alone = three.cli("migrate", "--env", "pr-2", "--store", "postgres")
    assert alone.code == 2 and "momentry-db adopt --env pr-2" in alone.err
    assert database.tables("pr_2") == {"videos"}
    assert database.query("SELECT id FROM pr_2.videos") == [(7,)]


def test_a_refusal_on_prod_is_prods_outcome_and_the_other_schemas_still_migrate(
        three, database, tmp_path: Path) -> None:
    assert three.cli("migrate", "--env", "prod", "--store", "postgres").code == 0
    plant(three, tmp_path, 'op.create_index("ix_videos_title", "videos", ["title"])', doc="index title")
    result = three.cli("migrate", "--all", "--store", "postgres", "--json")  # no terminal, no --accept-risky
    assert result.code == 1, result.err
    assert rows(result) == expected({"prod": ("refused", []), **{env: ("upgraded", ["0001", "0002"])
                                                                  for env in ALL[1:]}}, stores=("postgres",))
    refusal = errors(result)[("postgres", "prod")]
    assert refusal.startswith("prod: lint found 1 risky statement(s)") and "--accept-risky" in refusal
    assert json.loads(result.out)["summary"] == {"upgraded": 4, "up to date": 0, "failed": 0, "refused": 1}
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]
    text = three.cli("migrate", "--all", "--store", "postgres")
    assert text.code == 1
    assert text.out.splitlines()[0].startswith("postgres prod (schema public): refused: prod: lint found 1 risky")
    assert text.out.splitlines()[-1] == "done: 5 environment(s), 5 target(s): 0 upgraded, 4 up to date, 0 failed, 1 refused"


def test_unmanaged_prod_tables_refuse_prod_only(three, database) -> None:
    database.execute("CREATE TABLE public.videos (id int); INSERT INTO public.videos VALUES (1)")
    result = three.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 1, result.err
    assert rows(result) == expected({"prod": ("refused", [])}, stores=("postgres",))
    assert "momentry-db adopt --env prod" in errors(result)[("postgres", "prod")]
    assert database.tables("public") == {"videos"}
    assert database.query("SELECT id FROM public.videos") == [(1,)]


def test_a_rolled_back_target_reports_no_applied_revision(three, database, tmp_path: Path) -> None:
    plant(three, tmp_path, 'op.execute("SELECT 1/0")', doc="divides by zero")
    result = three.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 1
    # 0001 ran in each schema's transaction, then 0002 failed and took it back with it.
    assert rows(result) == expected({env: ("failed", []) for env in ALL}, stores=("postgres",))
    for env, schema in PG.items():  # compiled or not, the error names the revision that failed
        assert errors(result)[("postgres", env)].startswith(
            f"postgres {env} (schema {schema}): revision 0002 (divides by zero) failed: division by zero")
    for schema in PG.values():
        assert database.tables(schema) == set()


def test_one_environment_a_failing_store_does_not_stop_the_next_ones(three, database) -> None:
    with held_lock(database, "dev"):
        result = three.cli("migrate", "--env", "dev", "--lock-timeout", "0.5", "--json")
        text = three.cli("migrate", "--env", "dev", "--lock-timeout", "0.5")
    assert result.code == 1, result.err
    body = json.loads(result.out)
    assert body["ok"] is False
    (failure,) = [t for t in body["targets"] if t["outcome"] == "failed"]
    assert (failure["store"], failure["env"], failure["target"], failure["outcome"], failure["applied"]) == (
        "postgres", "dev", "dev", "failed", [])
    assert failure["error"].startswith("postgres dev (schema dev): migration lock held by other-run (pid ")
    assert [(s["store"], s["name"]) for s in body["applied"]] == [("mongo", "0001_chunks"), ("mongo", "0002_cache"),
                                                                  ("qdrant", "create")]
    assert database.tables("dev") == set()
    assert result.err.splitlines()[0].startswith("error: postgres dev (schema dev): migration lock held by other-run")

    assert text.code == 1
    assert text.err.splitlines()[0].startswith("error: postgres dev (schema dev): migration lock held by other-run")
    lines = text.out.splitlines()
    assert lines[0].startswith("postgres dev (schema dev): failed: postgres dev (schema dev): migration lock held")
    assert lines[1] == "mongo dev (database momentry_dev): up to date (at 0002_cache)"
    assert lines[2].startswith("qdrant dev (collection momentry_dev_rule1): up to date (at ")
    assert lines[3:] == ["done: 1 environment(s), 3 target(s): 0 upgraded, 2 up to date, 1 failed"]


class _BrokenMongo:
    """A MongoDB client that fails in a way no store error describes.

    A fake, because no real server can be made to fail this way on demand: the test needs an
    exception that is not a pymongo error, raised from every call.
    """

    def __getattr__(self, name: str):
        if name == "close":
            return lambda: None
        raise RuntimeError("socket closed by peer")

    def __getitem__(self, name: str):
        raise RuntimeError("socket closed by peer")


def test_an_unexpected_error_in_one_store_is_each_targets_outcome(project, database) -> None:
    """A fake Mongo client: no real server raises a non-pymongo error from every call on demand."""
    from momentry_db import command
    from momentry_db.settings import load_project

    proj = load_project(project.root, project.environ)
    result = command.migrate(proj, ["dev", "prod"], sources=command.Sources(mongo_client=_BrokenMongo()),
                             keep_going=True)
    assert result.ok is False
    got = [(t["store"], t["env"], t["outcome"], t["applied"], t["error"]) for t in result.to_json()["targets"]]
    assert got == [
        ("postgres", "prod", "upgraded", ["0001"], None), ("postgres", "dev", "upgraded", ["0001"], None),
        ("mongo", "prod", "failed", [], "mongo prod (database momentry): unexpected RuntimeError: socket closed by peer"),
        ("mongo", "dev", "failed", [], "mongo dev (database momentry_dev): unexpected RuntimeError: socket closed by peer"),
        ("qdrant", "prod", "upgraded", ["create"], None), ("qdrant", "dev", "upgraded", ["create"], None)]
    assert result.summary() == {"upgraded": 4, "up to date": 0, "failed": 2, "refused": 0}


def test_a_schema_downgraded_to_base_is_brought_back_by_the_fan_out(many, database) -> None:
    """Its alembic_version table is there but empty: not the same start as a schema never migrated."""
    assert many.cli("migrate", "--all", "--store", "postgres").code == 0
    assert many.cli("downgrade", "--env", "dev", "--to", "base").code == 0

    again = many.cli("migrate", "--all", "--store", "postgres", "--json")

    assert again.code == 0, again.out
    assert outcomes(again)[("postgres", "dev")] == "upgraded"
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]
    assert database.tables("dev") == isolated_tables() | BOOKKEEPING_TABLES


def _first_and_last_records(database, schemas: list[str]) -> dict[str, tuple]:
    return {s: database.query(f"SELECT min(recorded_at), max(recorded_at) FROM {s}.momentry_history")[0]
            for s in schemas}


def test_public_commits_before_any_other_schema_starts(many, database) -> None:
    # The env list is given prod last: the run still takes public first.
    result = many.cli("migrate", "--env", "staging", "--env", "pr-1", "--env", "dev", "--env", "prod",
                      "--store", "postgres")
    assert result.code == 0, result.err
    records = _first_and_last_records(database, ["public", "dev", "pr_1", "staging"])
    public_done = records["public"][1]
    assert all(public_done < first for schema, (first, _) in records.items() if schema != "public"), records


def test_schemas_at_the_same_revision_take_the_compiled_path(many, database, monkeypatch) -> None:
    """public gets its own compiled script, first; the other schemas share one; none goes through Alembic."""
    compiled: list[tuple[list[str], list[str]]] = []
    through_alembic: list[list[str]] = []
    real_compiled, real_many = postgres.upgrade_compiled, postgres.upgrade_many

    def spy_compiled(targets, *args, **kwargs):
        done, left = real_compiled(targets, *args, **kwargs)
        compiled.append(([t.schema for t in targets], [t.schema for t in left]))
        return done, left

    def spy_many(targets, *args, **kwargs):
        through_alembic.append([t.schema for t in targets])
        return real_many(targets, *args, **kwargs)

    monkeypatch.setattr(postgres, "upgrade_compiled", spy_compiled)
    monkeypatch.setattr(postgres, "upgrade_many", spy_many)
    result = many.cli("migrate", "--all", "--store", "postgres")
    assert result.code == 0, result.err
    assert compiled == [(["public"], []), (["dev", *SCHEMAS], [])]
    assert through_alembic == []
    for schema in ["public", "dev", *SCHEMAS]:
        assert database.query(f"SELECT version_num FROM {schema}.alembic_version") == [("0001",)]


def _lanes_spy(monkeypatch: pytest.MonkeyPatch, lanes: int) -> tuple[list[str], list[tuple[list[str], int]]]:
    """Record which lane ran each compiled schema; the first schema of each lane waits for the others to start,
    so the run only gets through when ``lanes`` connections work at once."""
    from momentry_db.stores.postgres import fanout

    ran_on: list[str] = []
    calls: list[tuple[list[str], int]] = []
    together = threading.Barrier(lanes, timeout=60)
    started: set[int] = set()
    real_run, real_compiled = fanout._run_compiled, postgres.upgrade_compiled

    def spy_run(conn, target, *args, **kwargs):
        me = threading.get_ident()
        if target.primary:  # public runs alone, before the lanes
            return real_run(conn, target, *args, **kwargs)
        if me not in started:
            started.add(me)
            together.wait()
        ran_on.append(threading.current_thread().name)
        return real_run(conn, target, *args, **kwargs)

    def spy_compiled(targets, *args, **kwargs):
        calls.append(([t.schema for t in targets], kwargs.get("parallel", 1)))
        return real_compiled(targets, *args, **kwargs)

    monkeypatch.setattr(fanout, "_run_compiled", spy_run)
    monkeypatch.setattr(postgres, "upgrade_compiled", spy_compiled)
    return ran_on, calls


def test_parallel_runs_the_compiled_script_on_k_connections_at_once(many, database, monkeypatch) -> None:
    """--parallel 2: public's compiled script first, then two lanes take the other schemas' from one
    queue; no schema goes through a per-schema Alembic run or a worker process."""
    ran_on, calls = _lanes_spy(monkeypatch, 2)
    through_alembic: list[list[str]] = []
    real_many = postgres.upgrade_many

    def spy_many(targets, *args, **kwargs):
        through_alembic.append([t.schema for t in targets])
        return real_many(targets, *args, **kwargs)

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker process ran a schema the compiled path could take")

    monkeypatch.setattr(postgres, "upgrade_many", spy_many)
    monkeypatch.setattr(postgres, "upgrade_chunk", no_workers)
    result = many.cli("migrate", "--all", "--store", "postgres", "--parallel", "2", "--json")
    assert result.code == 0, result.err
    assert [t["target"] for t in json.loads(result.out)["targets"]] == ["public", "dev", *SCHEMAS]
    assert set(outcomes(result).values()) == {"upgraded"}
    assert through_alembic == []
    assert calls == [(["public"], 2), (["dev", *SCHEMAS], 2)]
    assert len(ran_on) == 5 and len(set(ran_on)) == 2  # both lanes worked
    for schema in ["dev", *SCHEMAS]:
        assert database.tables(schema) == isolated_tables() | BOOKKEEPING_TABLES
        assert database.query(f"SELECT version_num FROM {schema}.alembic_version") == [("0001",)]
        assert database.query(f"SELECT step, outcome, duration_ms IS NOT NULL FROM {schema}.momentry_history") == [
            ("0001", "applied", True)]


def test_parallel_compiled_failure_is_its_own_targets_outcome(many, database, monkeypatch) -> None:
    database.execute("CREATE SCHEMA pr_2; CREATE SEQUENCE pr_2.videos START 7")
    ran_on, calls = _lanes_spy(monkeypatch, 2)
    result = many.cli("migrate", "--all", "--store", "postgres", "--parallel", "2", "--json")
    assert result.code == 1, result.err
    assert calls == [(["public"], 2), (["dev", *SCHEMAS], 2)] and len(set(ran_on)) == 2
    states = outcomes(result)
    assert states.pop(("postgres", "pr_2")) == "failed"
    assert set(states.values()) == {"upgraded"}
    failure = next(t for t in json.loads(result.out)["targets"] if t["target"] == "pr_2")
    assert failure["error"].startswith("postgres pr-2 (schema pr_2): revision 0001 (initial schema) failed:")
    assert database.tables("pr_2") == set()
    assert database.query("SELECT last_value FROM pr_2.videos") == [(7,)]
    for schema in ["dev", "pr_1", "pr_3", "staging"]:
        assert database.query(f"SELECT version_num FROM {schema}.alembic_version") == [("0001",)]


def test_a_compiled_schema_whose_lock_is_freed_while_it_waits_still_upgrades(many, database, monkeypatch) -> None:
    """The one-message run finds pr-1's lock held, waits for it the usual way, and runs once it is free."""
    from momentry_db.stores.postgres import fanout

    waited: list[str] = []
    other = psycopg.connect(database.url, autocommit=True, application_name="other-run")
    other.execute(postgres.lock_sql("pr_1", xact=False))
    real_acquire = fanout.acquire_lock

    def acquire_after_release(conn, target):
        waited.append(target.schema)
        other.close()  # the other run ends: its session lock goes with it
        return real_acquire(conn, target)

    monkeypatch.setattr(fanout, "acquire_lock", acquire_after_release)
    result = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert waited == ["pr_1"]
    assert set(outcomes(result).values()) == {"upgraded"}
    assert database.query("SELECT version_num FROM pr_1.alembic_version") == [("0001",)]
    assert database.query("SELECT step, outcome FROM pr_1.momentry_history") == [("0001", "applied")]
    assert database.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())") == [(0,)]


def test_a_schema_moved_after_the_plan_is_left_to_alembic(many, database, monkeypatch) -> None:
    """Another run migrates pr-2 between the plan and the compiled run: the guard sees it and rolls back,
    and Alembic's own run finds nothing left to do there."""
    real_compiled = postgres.upgrade_compiled
    left: list[list[str]] = []

    def move_then_compile(targets, *args, **kwargs):
        moved = next((t for t in targets if t.schema == "pr_2"), None)
        if moved is None:  # public's own compiled run
            return real_compiled(targets, *args, **kwargs)
        assert postgres.upgrade_many([moved])["pr_2"].error is None
        done, rest = real_compiled(targets, *args, **kwargs)
        left.append([t.schema for t in rest])
        return done, rest

    monkeypatch.setattr(postgres, "upgrade_compiled", move_then_compile)
    result = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert left == [["pr_2"]]
    assert database.query("SELECT version_num FROM pr_2.alembic_version") == [("0001",)]
    assert database.query("SELECT step, outcome FROM pr_2.momentry_history") == [("0001", "applied")]
    assert database.tables("pr_2") == isolated_tables() | BOOKKEEPING_TABLES


def _modules(project, *args: str) -> set[str]:
    """Every module a real run of momentry-db imports, by full name."""
    modules, result = project.imports(*args)
    assert result.code == 0, result.err[-2000:]
    return modules


def _dump(database, schema: str) -> str:
    """The schema's DDL as pg_dump writes it, without what differs between two servers' runs of the same
    DDL (an attribute option some servers stamp on every column with a counter)."""
    import re

    return re.sub(r"pg_attver=\d+", "pg_attver=N", database.dump_schema(schema))


def _emptied(database, schemas: list[str]) -> None:
    """Every schema of the run dropped, public made again: the database as a first run finds it."""
    database.execute("; ".join(f"DROP SCHEMA IF EXISTS {s} CASCADE" for s in schemas)
                     + "; CREATE SCHEMA public AUTHORIZATION pg_database_owner; GRANT USAGE ON SCHEMA public TO PUBLIC; "
                     "COMMENT ON SCHEMA public IS 'standard public schema'")


def test_a_second_run_from_empty_takes_the_kept_scripts_and_imports_neither_alembic_nor_the_models(
        many, database) -> None:
    """The first run renders public's script and the other schemas' one and keeps them in the state
    directory; a later run over an empty database sends them as they are, with the same result."""
    args = ("migrate", "--all", "--store", "postgres")
    schemas = ["public", "dev", *SCHEMAS]
    cold = _modules(many, *args)
    assert {"alembic", "momentry_db.models"} <= cold
    kept = json.loads((Path(many.environ["MOMENTRY_STATE_DIR"]) / "postgres-scripts.json").read_text())
    assert sorted(kept["templates"]) == ["public:", "schema:"]
    assert kept["line"] == [["0001", "initial schema", False]]
    dumps = {s: _dump(database, s) for s in schemas}
    _emptied(database, schemas)
    warm = _modules(many, *args)
    assert not {m for m in warm if m.startswith(("alembic", "momentry_db.models", "momentry_db.tables"))}, warm
    assert {s: _dump(database, s) for s in schemas} == dumps
    for schema in schemas:
        assert database.query(f"SELECT version_num FROM {schema}.alembic_version") == [("0001",)]
        assert database.query(f"SELECT env, step, outcome FROM {schema}.momentry_history") == [
            ("prod" if schema == "public" else schema.replace("_", "-"), "0001", "applied")]


def test_public_compiled_is_the_public_alembic_makes(many, database, tmp_path: Path) -> None:
    """prod's compiled run (shared tables and views included) leaves public as Alembic's own run does."""
    assert many.alembic("-x", "schema=public", "upgrade", "head").code == 0
    by_alembic = _dump(database, "public")
    _emptied(database, ["public"])
    result = many.cli("migrate", "--env", "prod", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert [t["applied"] for t in json.loads(result.out)["targets"]] == [["0001"]]
    assert "public:" in json.loads((Path(many.environ["MOMENTRY_STATE_DIR"]) / "postgres-scripts.json").read_text())[
        "templates"]
    assert _dump(database, "public") == by_alembic


@pytest.mark.parametrize("damage", ["other key", "not json"])
def test_a_kept_record_that_no_longer_holds_is_not_used(many, database, damage: str) -> None:
    """A record kept for other revision files (or a torn one) is ignored and written again: its scripts
    never reach a schema."""
    args = ("migrate", "--all", "--store", "postgres")
    assert many.cli(*args).code == 0
    file = Path(many.environ["MOMENTRY_STATE_DIR"]) / "postgres-scripts.json"
    kept = json.loads(file.read_text())
    key = list(kept["key"])
    if damage == "other key":
        kept["key"] = [[*kept["key"][0][:1], kept["key"][0][1] + 1, *kept["key"][0][2:]], *kept["key"][1:]]
        kept["templates"] = {name: "CREATE TABLE planted (id int);" for name in kept["templates"]}
        file.write_text(json.dumps(kept))
    else:
        file.write_text(file.read_text()[:100])
    _emptied(database, ["public", "dev", *SCHEMAS])
    result = many.cli(*args, "--json")
    assert result.code == 0, result.err
    assert set(outcomes(result).values()) == {"upgraded"}
    for schema in ["dev", *SCHEMAS]:
        assert database.tables(schema) == isolated_tables() | BOOKKEEPING_TABLES
    again = json.loads(file.read_text())
    assert "planted" not in json.dumps(again["templates"]) and again["key"] == key


@pytest.mark.parametrize("scopes", [None, {"shared": "videos", "isolated": [], "views": [], "bookkeeping": []}],
                         ids=["an-earlier-release", "damaged"])
def test_kept_names_by_scope_missing_or_damaged_are_read_from_the_models_and_kept(tmp_path, scopes) -> None:
    """A record an earlier release wrote (no names by scope) or one whose names are not lists gives the
    models' own names, and keeps them; the rest of the record stays."""
    from momentry_db.stores.postgres.planning import Scopes
    from momentry_db.tables import shared_tables, view_names

    file = tmp_path / "postgres-scripts.json"
    first = postgres.Kept.open(file, None)
    first.data.update({"heads": ["0001"], **({"scopes": scopes} if scopes else {})})
    first._save()
    kept = postgres.Kept.open(file, None)
    assert kept.heads() == ("0001",)
    assert kept.scopes() == Scopes(isolated_tables(), shared_tables(), view_names(), BOOKKEEPING_TABLES)
    again = json.loads(file.read_text())
    assert again["heads"] == ["0001"]
    assert again["scopes"] == {"isolated": sorted(isolated_tables()), "shared": sorted(shared_tables()),
                               "views": sorted(view_names()), "bookkeeping": sorted(BOOKKEEPING_TABLES)}
    assert postgres.Kept.open(file, None).tables() == sorted(isolated_tables() | shared_tables())


def test_percent_signs_in_a_revision_reach_every_compiled_schema_as_written(many, database, tmp_path) -> None:
    """The driver reads ``%%`` as ``%``: the SQL, the description in the history and the revision's
    marker all come out as the revision wrote them."""
    plant(many, tmp_path, 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))\n'
                          'op.execute("COMMENT ON TABLE extras IS \'100%s %% sure\'")', doc="extras at 100% %s")
    result = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert set(outcomes(result).values()) == {"upgraded"}
    for schema in ["public", "dev", *SCHEMAS]:
        assert database.query(f"SELECT obj_description('{schema}.extras'::regclass)") == [("100%s %% sure",)]
        assert database.query(f"SELECT step, description FROM {schema}.momentry_history ORDER BY id") == [
            ("0001", "initial schema"), ("0002", "extras at 100% %s")]


@pytest.mark.parametrize("offline", ["context.is_offline_mode()", "op.get_context().as_sql"])
def test_a_revision_that_branches_on_offline_mode_runs_through_alembic_everywhere(many, database, tmp_path,
                                                                                 monkeypatch, offline: str) -> None:
    """Compiling renders offline: a revision that does something else online would lose it, so its
    path runs through Alembic in every schema, and what it does online lands."""
    through_alembic: list[list[str]] = []
    real_many = postgres.upgrade_many

    def spy_many(targets, *args, **kwargs):
        through_alembic.append([t.schema for t in targets])
        return real_many(targets, *args, **kwargs)

    monkeypatch.setattr(postgres, "upgrade_many", spy_many)
    plant(many, tmp_path, 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))\n'
                          'from alembic import context\n'
                          f'if not {offline}:\n'
                          '    op.execute("INSERT INTO extras VALUES (1)")', doc="extras")
    result = many.cli("migrate", "--all", "--store", "postgres", "--json")
    assert result.code == 0, result.err
    assert set(outcomes(result).values()) == {"upgraded"}
    assert through_alembic == [["public"], ["dev", *SCHEMAS]]
    for schema in ["public", "dev", *SCHEMAS]:
        assert database.query(f"SELECT id FROM {schema}.extras") == [(1,)]


def _compiled_lines(result) -> list[str]:
    return [line for line in result.err.splitlines() if "[momentry_db]" in line]


def test_plain_alembic_upgrade_head_takes_the_compiled_path_over_every_environment(many, database) -> None:
    result = many.alembic("upgrade", "head")
    assert result.code == 0, result.err
    assert _compiled_lines(result) == [f"INFO  [momentry_db] Running upgrade -> 0001, initial schema on schema {s} "
                                       "(compiled)" for s in ["dev", *SCHEMAS]]
    assert [line for line in result.err.splitlines() if "[alembic.runtime.migration] Running upgrade" in line] == [
        "INFO  [alembic.runtime.migration] Running upgrade  -> 0001, initial schema"]  # public's, through Alembic
    for schema in ["dev", *SCHEMAS]:
        assert database.tables(schema) == isolated_tables() | BOOKKEEPING_TABLES
        assert database.query(f"SELECT version_num FROM {schema}.alembic_version") == [("0001",)]
        assert database.query(f"SELECT env, step, outcome FROM {schema}.momentry_history") == [
            ("dev" if schema == "dev" else schema.replace("_", "-"), "0001", "applied")]
    assert many.cli("verify", "--env", "staging", "--store", "postgres").code == 0
    again = many.alembic("upgrade", "head")
    assert again.code == 0 and _compiled_lines(again) == []


def test_plain_alembic_reports_a_failing_compiled_schema_and_upgrades_the_others(many, database, tmp_path) -> None:
    plant(many, tmp_path, 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))', doc="extras")
    up_to = many.alembic("upgrade", "0001")  # not the head: one schema at a time, through Alembic
    assert up_to.code == 0 and _compiled_lines(up_to) == []
    assert _compiled_lines(many.alembic("-x", "schema=pr_3", "upgrade", "head")) == []
    database.execute("CREATE TABLE staging.extras (id int)")
    result = many.alembic("upgrade", "head")
    assert result.code == 1
    assert [line for line in result.err.splitlines() if line.startswith(("ERROR", "error:"))] == [
        'ERROR [momentry_db] postgres staging (schema staging): revision 0002 (extras) failed: relation "extras" '
        "already exists",
        'error: postgres staging (schema staging): revision 0002 (extras) failed: relation "extras" already exists']
    assert [line for line in _compiled_lines(result) if "INFO" in line] == [
        f"INFO  [momentry_db] Running upgrade -> 0002, extras on schema {s} (compiled)" for s in ["dev", "pr_1", "pr_2"]]
    versions = {s: database.query(f"SELECT version_num FROM {s}.alembic_version")[0][0]
                for s in ["public", "dev", *SCHEMAS]}
    assert versions == {"public": "0002", "dev": "0002", "pr_1": "0002", "pr_2": "0002", "pr_3": "0002",
                        "staging": "0001"}
    assert database.query("SELECT step, outcome FROM staging.momentry_history ORDER BY id") == [
        ("0001", "applied"), ("revision 0002 (extras)", "failed")]


def test_a_no_op_over_every_store_opens_no_qdrant_storage_and_takes_no_mongo_lock(three, database,
                                                                                  monkeypatch) -> None:
    """At head, every environment answers from what was read: Qdrant's local storage stays closed (its
    lock, held here by another process, is never waited on), MongoDB's migration lock is not taken (a
    live holder does not delay anyone), and one MongoDB client serves every environment of a server."""
    import fcntl

    import pymongo

    assert three.cli("migrate", "--all").code == 0
    state = Path(three.environ["MOMENTRY_STATE_DIR"])
    other = pymongo.MongoClient(three.environ["MONGODB_URL"])
    clients = count_mongo_clients(monkeypatch)
    now = datetime.datetime.now(datetime.timezone.utc)
    other["momentry_pr_2"]["momentry_migrate_lock"].insert_one(
        {"_id": "migrate", "owner": "other-host:1:x", "acquired_at": now,
         "expires_at": now + datetime.timedelta(minutes=5)})
    with open(state / "qdrant.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        noop = three.cli("migrate", "--all", "--lock-timeout", "0", "--json")
        fcntl.flock(held, fcntl.LOCK_UN)
    other.close()
    assert noop.code == 0, noop.out
    assert {(t["store"], t["outcome"]) for t in json.loads(noop.out)["targets"]} == {
        ("postgres", "up to date"), ("mongo", "up to date"), ("qdrant", "up to date")}
    assert clients == [three.environ["MONGODB_URL"]]  # five environments, one server, one client
    # A change made behind the stamp's back in one environment is still seen, and only that one is redone.
    with local_qdrant(state) as client:
        client.delete_collection(next(a.collection_name for a in client.get_aliases().aliases
                                      if a.alias_name == "momentry_pr_1_rule1"))
    again = three.cli("migrate", "--all", "--store", "qdrant", "--json")
    assert again.code == 0, again.out
    assert {t["env"]: t["applied"] for t in json.loads(again.out)["targets"]} == {
        "prod": [], "dev": [], "pr-1": ["create"], "pr-2": [], "pr-3": []}



def test_a_no_op_migrate_imports_no_alembic_while_the_revision_files_are_unchanged(many, database,
                                                                                    tmp_path) -> None:
    args = ("migrate", "--all", "--store", "postgres")
    assert "alembic" in _imports(many, *args)  # the first run loads and checks the revision files
    cache = Path(many.environ["MOMENTRY_STATE_DIR"]) / "postgres-scripts.json"
    assert json.loads(cache.read_text())["heads"] == ["0001"]
    assert "alembic" not in _imports(many, *args)  # at head: the heads come from the state directory
    # A new revision file is seen at once, and applied.
    plant(many, tmp_path, 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))', doc="extras")
    result = many.cli(*args, "--json")
    assert result.code == 0, result.err
    assert {t["target"]: t["applied"] for t in json.loads(result.out)["targets"]} == {
        s: ["0002"] for s in ["public", "dev", *SCHEMAS]}
    assert json.loads(cache.read_text())["heads"] == ["0002"]
    # A revision file broken after that is refused again, before any connection.
    revision = tmp_path / "migrations" / "versions" / "0002_planted.py"
    revision.write_text(revision.read_text() + "\nthis is not python\n")
    broken = many.cli(*args)
    assert broken.code == 2
    assert broken.err.splitlines()[-1].startswith("error: ") and "0002_planted.py" in broken.err
