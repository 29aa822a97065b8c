"""reset: every store is checked before anything is dropped, and only what momentry-db manages is dropped."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from qdrant_client import QdrantClient, models

from momentry_db import command
from momentry_db.errors import StoreError
from momentry_db.settings import load_project

SAMPLE = """
INSERT INTO {s}.videos (source_path) VALUES ('a.mp4'), ('b.mp4'), ('c.mp4');
INSERT INTO {s}.chunks (video_id, sequence, start_seconds, end_seconds)
  SELECT v.id, g, g * 10, g * 10 + 10 FROM {s}.videos v, generate_series(0, 2) g;
"""
DEV_ROWS = {"videos": 3, "chunks": 9}
DEV_POINTS = 5


def counts(database, schema: str) -> dict[str, int]:
    return {t: database.query(f"SELECT count(*) FROM {schema}.{t}")[0][0] for t in DEV_ROWS}


def state_dir(project) -> Path:
    return Path(project.environ["MOMENTRY_STATE_DIR"])


def dev_points(project) -> int:
    client = QdrantClient(path=str(state_dir(project) / "qdrant"))
    try:
        return client.count("momentry_dev_rule1").count
    finally:
        client.close()


@pytest.fixture
def dev(project, database):
    """dev migrated (postgres and qdrant local mode), with rows and points in it."""
    assert project.cli("migrate", "--env", "dev").code == 0
    database.execute(SAMPLE.format(s="dev"))
    client = QdrantClient(path=str(state_dir(project) / "qdrant"))
    try:
        client.upsert("momentry_dev_rule1", points=[
            models.PointStruct(id=i, vector=[1.0] * 1024, payload={"video_id": i}) for i in range(DEV_POINTS)])
    finally:
        client.close()
    return project


def snapshot(project, database) -> tuple:
    return counts(database, "dev"), database.dump_schema("dev"), dev_points(project)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a store that cannot be reached, or is in use: refused before anything is dropped --------


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_unreachable_mongo_refuses_before_dropping_anything(dev, database, silent_server, kind: str) -> None:
    port = closed_port() if kind == "closed" else silent_server[0]
    before = snapshot(dev, database)
    result = dev.cli("reset", "--env", "dev", "--yes", env={"MONGODB_URL": f"mongodb://127.0.0.1:{port}/"})
    assert result.code == 2, result.err
    assert "mongo: cannot reach" in result.err and "nothing was dropped" in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "configured timeouts" not in errors[0]
    assert snapshot(dev, database) == before


def test_silent_redis_refuses_before_dropping_anything(dev, database, silent_server) -> None:
    before = snapshot(dev, database)
    result = dev.cli("reset", "--env", "dev", "--yes",
                     env={"REDIS_URL": f"redis://:hunter2secret@127.0.0.1:{silent_server[0]}/0"})
    assert result.code == 2, result.err
    assert "redis: cannot reach" in result.err and "nothing was dropped" in result.err
    assert "hunter2secret" not in result.err + result.out
    assert snapshot(dev, database) == before


HOLD_QDRANT = """
import sys
from qdrant_client import QdrantClient
client = QdrantClient(path=sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""
HOLD_FLOCK = """
import fcntl, sys
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("holder", ["qdrant-client", "momentry-db run"])
def test_qdrant_local_storage_in_use_refuses_before_dropping_anything(dev, database, holder: str) -> None:
    state = state_dir(dev)
    script, path = ((HOLD_QDRANT, state / "qdrant") if holder == "qdrant-client"
                    else (HOLD_FLOCK, state / "qdrant.lock"))
    before = snapshot(dev, database)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        result = dev.cli("reset", "--env", "dev", "--yes")
    finally:
        proc.communicate("")
    assert result.code == 2, result.err
    assert "qdrant" in result.err and "nothing was dropped" in result.err
    assert snapshot(dev, database) == before


def test_postgres_lock_held_by_another_run_refuses(dev, database) -> None:
    from momentry_db.stores.postgres import LOCK_CLASS

    before = snapshot(dev, database)
    with psycopg.connect(database.url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext('dev'))", (LOCK_CLASS,))
        result = dev.cli("reset", "--env", "dev", "--yes")
    assert result.code == 2, result.err
    assert "postgres" in result.err and "lock" in result.err and "nothing was dropped" in result.err
    assert snapshot(dev, database) == before


def test_mongo_lock_held_by_another_run_refuses(dev, database, mongo_url: str, mongo_db_name: str) -> None:
    import datetime as dt

    from pymongo import MongoClient

    client = MongoClient(mongo_url, tz_aware=True)
    db = client[mongo_db_name]
    db.cache.insert_many([{"key": f"k{i}"} for i in range(4)])
    now = dt.datetime.now(dt.timezone.utc)
    db.momentry_migrate_lock.insert_one(
        {"_id": "migrate", "owner": "ci:42:abc", "acquired_at": now, "expires_at": now + dt.timedelta(minutes=5)})
    before = snapshot(dev, database)
    result = dev.cli("reset", "--env", "dev", "--yes",
                     env={"MONGODB_URL": mongo_url, "MONGODB_DATABASE": mongo_db_name})
    assert result.code == 2, result.err
    (error,) = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: reset dev refused: mongo dev (database {mongo_db_name}): "
                            "migration lock held by ci:42:abc since ")
    assert error.endswith("; retry when it finishes; nothing was dropped, fix this and run reset again")
    assert snapshot(dev, database) == before
    assert db.cache.count_documents({}) == 4
    assert db.momentry_migrate_lock.count_documents({}) == 1
    client.close()


# --- a drop that still fails: the message says what was dropped and what was not -------------


def _client_whose_drop_is_not_authorized(url: str):
    """A real client on the test server whose drop_database is refused as an unauthorized login's is.

    SecantusDB has no users or roles, so the refusal a production login gets is injected here;
    everything else this client does reaches the real server.
    """
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure

    class DropNotAuthorized(MongoClient):
        def drop_database(self, name, *args, **kwargs):
            raise OperationFailure(f"not authorized on {name} to execute command {{ dropDatabase: 1 }}")

    return DropNotAuthorized(url, tz_aware=True)


def test_a_drop_failing_midway_names_what_was_and_was_not_dropped(dev, database, mongo_url: str,
                                                                  mongo_db_name: str) -> None:
    """The refused drop is injected (SecantusDB has no roles to refuse it); all else is the real server."""
    client = _client_whose_drop_is_not_authorized(mongo_url)
    client[mongo_db_name].cache.insert_one({"key": "k"})
    lib = load_project(dev.root, {**dev.environ, "MONGODB_DATABASE": mongo_db_name})
    with pytest.raises(StoreError) as caught:
        command.reset(lib, "dev", sources=command.Sources(mongo_client=client))
    message = str(caught.value)
    assert message.startswith(f"mongo dev (database {mongo_db_name}): drop failed: ")
    assert "not authorized" in message
    assert (f"already dropped: postgres schema dev; not dropped: mongo database {mongo_db_name}, "
            "qdrant collection momentry_dev_rule1") in message
    assert database.query("SELECT 1 FROM pg_namespace WHERE nspname = 'dev'") == []
    assert client[mongo_db_name].cache.count_documents({}) == 1
    assert dev_points(dev) == DEV_POINTS
    client.close()


# --- only schemas momentry-db manages are dropped --------------------------------------------


def test_unmanaged_non_empty_schema_is_refused_and_its_rows_kept(project, database) -> None:
    database.execute("CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int PRIMARY KEY, total int);"
                     "INSERT INTO billing.invoices SELECT g, g * 100 FROM generate_series(1, 7) g")
    before = database.dump_schema("billing")
    result = project.cli("reset", "--env", "dev", "--yes", env={"DATABASE_SCHEMA": "billing"})
    assert result.code == 2, result.err
    assert "billing" in result.err and "alembic_version" in result.err and "nothing was dropped" in result.err
    assert database.query("SELECT count(*), sum(total) FROM billing.invoices") == [(7, 2800)]
    assert database.dump_schema("billing") == before


def test_empty_unmanaged_schema_is_reset(project, database) -> None:
    database.execute("CREATE SCHEMA billing")
    result = project.cli("reset", "--env", "dev", "--yes", env={"DATABASE_SCHEMA": "billing"})
    assert result.code == 0, result.err
    assert "postgres dev: dropped billing" in result.out
    assert database.query("SELECT version_num FROM billing.alembic_version") == [("0001",)]
    assert "videos" in database.tables("billing")


def test_managed_schema_with_rows_is_reset(dev, database) -> None:
    result = dev.cli("reset", "--env", "dev", "--yes")
    assert result.code == 0, result.err
    assert counts(database, "dev") == {"videos": 0, "chunks": 0}
    assert dev_points(dev) == 0


# --- partitions and inheritance reach across schemas -----------------------------------------

CROSSINGS = {
    "dev partition of a public table": ("public.part", """
        CREATE TABLE public.part (id int, k int) PARTITION BY RANGE (k);
        CREATE TABLE dev.part_1 PARTITION OF public.part FOR VALUES FROM (0) TO (100);
        INSERT INTO public.part SELECT g, g FROM generate_series(0, 9) g"""),
    "public partition of a dev table": ("public.part_1", """
        CREATE TABLE dev.part (id int, k int) PARTITION BY RANGE (k);
        CREATE TABLE public.part_1 PARTITION OF dev.part FOR VALUES FROM (0) TO (100);
        INSERT INTO public.part_1 SELECT g, g FROM generate_series(0, 9) g"""),
    "dev table inheriting a public one": ("public.parent", """
        CREATE TABLE public.parent (id int);
        CREATE TABLE dev.child () INHERITS (public.parent);
        INSERT INTO public.parent SELECT g FROM generate_series(0, 3) g;
        INSERT INTO dev.child SELECT g FROM generate_series(0, 5) g"""),
    "public table inheriting a dev one": ("public.child", """
        CREATE TABLE dev.parent (id int);
        CREATE TABLE public.child () INHERITS (dev.parent);
        INSERT INTO public.child SELECT g FROM generate_series(0, 9) g"""),
}


@pytest.mark.parametrize("case", list(CROSSINGS))
def test_partitions_and_inheritance_across_schemas_are_refused(dev, database, case: str) -> None:
    table, sql = CROSSINGS[case]
    database.execute(textwrap.dedent(sql))
    rows = database.query(f"SELECT count(*) FROM {table}")
    public_before, dev_before = database.dump_schema("public"), snapshot(dev, database)
    result = dev.cli("reset", "--env", "dev", "--yes")
    assert result.code == 2, result.err
    assert "postgres" in result.err and "nothing was dropped" in result.err
    assert any(word in result.err for word in ("partition", "inherit"))
    assert database.query(f"SELECT count(*) FROM {table}") == rows
    assert database.dump_schema("public") == public_before
    assert snapshot(dev, database) == dev_before
