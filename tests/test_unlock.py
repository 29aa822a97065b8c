"""momentry-db unlock for PostgreSQL and Qdrant: show the holder, release only with --yes, only ours."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import psycopg
import pytest

from momentry_db.stores import postgres
from tests.helpers import wait_until


def hold_schema_lock(url: str, schema: str, application_name: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True, application_name=application_name)
    conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (postgres.LOCK_CLASS, schema))
    return conn


def lock_holders(database, schema: str) -> list[int]:
    rows = database.query("SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                          "AND l.classid = %s::oid AND l.objid = (hashtext(%s)::bigint & 4294967295)::text::oid "
                          "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                          (str(postgres.LOCK_CLASS), schema))
    return [r[0] for r in rows]


def test_postgres_unlock_shows_the_backend_and_ends_it_only_with_yes(project, database) -> None:
    holder = hold_schema_lock(database.url, "dev", "momentry-db dev pid 999999")
    pid = holder.info.backend_pid
    try:
        refused = project.cli("unlock", "--env", "dev", "--store", "postgres")
        assert refused.code == 2
        assert refused.err.startswith(f"error: postgres dev (schema dev): migration lock held by backend pid {pid} "
                                      "(momentry-db dev pid 999999, from ")
        assert "--store postgres --yes" in refused.err and len(refused.err.splitlines()) == 1
        assert lock_holders(database, "dev") == [pid]

        released = project.cli("unlock", "--env", "dev", "--store", "postgres", "--yes")
        assert released.code == 0, released.err
        assert released.out.startswith(f"postgres dev (schema dev): released the migration lock held by "
                                       f"backend pid {pid} (momentry-db dev pid 999999")
        wait_until(lambda: lock_holders(database, "dev") == [], "the ended backend to let go of its lock")
        with pytest.raises(psycopg.OperationalError, match=r"terminat|server closed the connection|consuming input failed"):
            holder.execute("SELECT 1")
    finally:
        holder.close()
    again = project.cli("unlock", "--env", "dev", "--store", "postgres", "--yes")
    assert (again.code, again.out) == (0, "postgres dev: no migration lock held\n")


def test_postgres_unlock_never_ends_a_session_that_is_not_momentry_db(project, database) -> None:
    holder = hold_schema_lock(database.url, "dev", "psql")
    pid = holder.info.backend_pid
    try:
        refused = project.cli("unlock", "--env", "dev", "--store", "postgres", "--yes")
        assert refused.code == 2
        assert refused.err == (f"error: postgres dev (schema dev): migration lock held by backend pid {pid} "
                               f"(psql, from {refused.err.split('from ', 1)[1].split(',')[0]}, since "
                               + refused.err.split(", since ", 1)[1].split(", ")[0]
                               + f", idle); backend pid {pid} is not a momentry-db session; end it yourself "
                               f"(SELECT pg_terminate_backend({pid})) if it must go\n")
        assert lock_holders(database, "dev") == [pid]
        assert holder.execute("SELECT 1").fetchone() == (1,)
    finally:
        holder.close()


def test_postgres_unlock_leaves_other_schemas_locks_alone(project, database) -> None:
    holder = hold_schema_lock(database.url, "public", "momentry-db prod pid 1")
    try:
        result = project.cli("unlock", "--env", "dev", "--store", "postgres", "--yes")
        assert (result.code, result.out) == (0, "postgres dev: no migration lock held\n")
        assert lock_holders(database, "public") == [holder.info.backend_pid]
    finally:
        holder.close()


def test_postgres_unlock_sees_only_this_databases_lock(project, database, admin_url: str) -> None:
    """Advisory locks belong to one database: a run on the same schema name in another database on the
    server is neither shown nor ended."""
    import uuid

    from psycopg import sql

    from tests.helpers import with_database

    other = f"momentry_test_other_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        holder = hold_schema_lock(with_database(admin_url, other), "dev", "momentry-db dev pid 1")
        try:
            status = project.cli("unlock", "--env", "dev", "--store", "postgres", "--yes")
            assert (status.code, status.out) == (0, "postgres dev: no migration lock held\n")
            assert holder.execute("SELECT 1").fetchone() == (1,)  # not ended
            migrated = project.cli("migrate", "--env", "dev", "--store", "postgres", "--lock-timeout", "0")
            assert migrated.code == 0, migrated.err  # nor waited for
        finally:
            holder.close()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other)))


def test_qdrant_unlock_reports_a_local_file_lock_and_cannot_release_it(bare_project) -> None:
    proj = bare_project
    state = Path(proj.environ["MOMENTRY_STATE_DIR"])
    free = proj.cli("unlock", "--env", "dev", "--store", "qdrant")
    assert (free.code, free.out) == (0, "qdrant dev: no migration lock held\n")

    state.mkdir(exist_ok=True)
    with open(state / "qdrant.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = proj.cli("unlock", "--env", "dev", "--store", "qdrant", "--yes")
    assert held.code == 2
    assert held.err == (f"qdrant: QDRANT_URL is not set; using local mode in {state / 'qdrant'}\n"
                        f"error: qdrant dev (local mode): migration lock held by a live process using "
                        f"{state / 'qdrant'}; a file lock ends with its process; wait for that run or stop it\n")


def test_qdrant_unlock_removes_a_lock_collection_only_with_yes(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient, models

    from momentry_db import command
    from momentry_db.errors import RefusedError
    from momentry_db.settings import load_project

    client = QdrantClient(":memory:")  # stands in for a server: the lock is a collection there
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    sources = command.Sources(qdrant_client=client)
    client.create_collection("momentry_dev_rule1__lock",
                             vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
                             metadata={"momentry_lock": {"owner": "ci-7:4242", "expires_at": time.time() + 600}})
    client.create_collection("momentry_rule1__lock",  # prod's, never touched by a dev unlock
                             vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
                             metadata={"momentry_lock": {"owner": "ci-8:1", "expires_at": time.time() + 600}})
    with pytest.raises(RefusedError, match=r"^qdrant dev \(collection momentry_dev_rule1\): migration lock held "
                                           r"by ci-7:4242 \(lease until .*\); its lease is live"):
        command.unlock(proj, "dev", "qdrant", sources=sources)
    assert client.collection_exists("momentry_dev_rule1__lock")

    result = command.unlock(proj, "dev", "qdrant", yes=True, sources=sources)
    assert result.ok and result.lines[0].startswith("qdrant dev (collection momentry_dev_rule1): released the "
                                                    "migration lock held by ci-7:4242")
    assert not client.collection_exists("momentry_dev_rule1__lock")
    assert client.collection_exists("momentry_rule1__lock")


def test_qdrant_unlock_never_removes_a_lock_that_changed_hands(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient, models

    from momentry_db.settings import load_project
    from momentry_db.stores import qdrant

    client = QdrantClient(":memory:")
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    target = qdrant.QdrantTarget(proj.environment("dev"), client=client)

    def hold(owner: str) -> None:
        client.create_collection("momentry_dev_rule1__lock",
                                 vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
                                 metadata={"momentry_lock": {"owner": owner, "expires_at": time.time() + 600}})

    hold("ci-7:4242")
    (shown,) = qdrant.held_locks(target, qdrant.load_specs())
    client.delete_collection("momentry_dev_rule1__lock")
    hold("ci-9:1")  # another run took it after it was shown
    assert qdrant.release_lock(target, shown) is False
    assert client.collection_exists("momentry_dev_rule1__lock")
    (now,) = qdrant.held_locks(target, qdrant.load_specs())
    assert qdrant.release_lock(target, now) is True
    assert not client.collection_exists("momentry_dev_rule1__lock")
    assert qdrant.release_lock(target, now) is False
