"""reset, clone, adopt, env-file and envs: what changes, and what stays untouched."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from qdrant_client import QdrantClient

from momentry_db import command
from momentry_db.errors import RefusedError
from momentry_db.models import VIEWS, metadata
from momentry_db.settings import load_project
from tests.helpers import add_points, local_qdrant

SAMPLE = """
INSERT INTO {s}.videos (source_path) VALUES ('a.mp4'), ('b.mp4'), ('c.mp4');
INSERT INTO {s}.chunks (video_id, sequence, start_seconds, end_seconds)
  SELECT v.id, g, g * 10, g * 10 + 10 FROM {s}.videos v, generate_series(0, 2) g;
INSERT INTO {s}.frames (video_id, frame_number, timestamp_seconds)
  SELECT v.id, g, g FROM {s}.videos v, generate_series(0, 1) g WHERE v.source_path <> 'c.mp4';
"""


def counts(database, schema: str, tables=("videos", "chunks", "frames")) -> dict[str, int]:
    return {t: database.query(f"SELECT count(*) FROM {schema}.{t}")[0][0] for t in tables}


def qdrant_count(state: Path, name: str) -> int:
    client = QdrantClient(path=str(state / "qdrant"))
    try:
        return client.count(name).count
    finally:
        client.close()


@pytest.fixture
def lib(project):
    return load_project(project.root, project.environ)


@pytest.fixture
def state(project) -> Path:
    return Path(project.environ["MOMENTRY_STATE_DIR"])


@pytest.fixture
def mongo_server(project, fresh_mongo_url: str):
    """A client on a MongoDB server of this test's own, which the project's environments use by their
    default database names."""
    from pymongo import MongoClient

    project.environ["MONGODB_URL"] = fresh_mongo_url
    client = MongoClient(fresh_mongo_url)
    yield client
    client.close()


@pytest.fixture
def populated(mongo_server, project, lib, database, state):
    """prod and dev migrated in every store, with data in each."""
    sources = command.Sources()
    for env in ("prod", "dev"):
        command.migrate(lib, env, sources=sources)
    database.execute(SAMPLE.format(s="public"))
    database.execute(SAMPLE.format(s="dev"))
    for db in ("momentry", "momentry_dev"):
        mongo_server[db].cache.insert_many([{"key": f"k{i}"} for i in range(4)])
    with local_qdrant(state) as client:
        add_points(client, "momentry_rule1", 30)
        add_points(client, "momentry_dev_rule1", 5)
    return sources


# --- reset -----------------------------------------------------------------------------------


def test_reset_prod_is_refused_whatever_the_flags(project, database) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    database.execute(SAMPLE.format(s="public"))
    result = project.cli("reset", "--env", "prod", "--yes")
    assert result.code == 2
    assert "refused for prod" in result.err
    assert counts(database, "public")["videos"] == 3


def test_reset_without_yes_and_without_a_terminal_is_refused(project, database) -> None:
    assert project.cli("migrate", "--env", "dev").code == 0
    database.execute(SAMPLE.format(s="dev"))
    result = project.momentry_db("--project-dir", str(project.root), "reset", "--env", "dev")
    assert result.code == 2
    assert "needs --yes" in result.err
    assert counts(database, "dev")["videos"] == 3


def test_reset_dev_leaves_every_prod_store_untouched(mongo_server, lib, database, state, populated) -> None:
    prod_rows = counts(database, "public")
    prod_dump = database.dump_schema("public")
    result = command.reset(lib, "dev", sources=populated)
    assert result.data["dropped"]["postgres"] == "dev"
    assert counts(database, "public") == prod_rows
    assert database.dump_schema("public") == prod_dump
    assert counts(database, "dev") == {"videos": 0, "chunks": 0, "frames": 0}
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]
    assert mongo_server["momentry"].cache.count_documents({}) == 4
    assert mongo_server["momentry_dev"].cache.count_documents({}) == 0
    assert mongo_server["momentry_dev"].cache.index_information()["key"]["unique"] is True  # migrated again
    assert qdrant_count(state, "momentry_rule1") == 30
    assert qdrant_count(state, "momentry_dev_rule1") == 0


@pytest.mark.redis
def test_reset_dev_deletes_only_dev_redis_keys(project, redis_url: str) -> None:
    import redis

    tag = uuid.uuid4().hex[:8]
    (project.root / ".env").write_text(f"MOMENTRY_REDIS_PREFIX=t{tag}:\n")
    (project.root / ".env.development").write_text(f"MOMENTRY_REDIS_PREFIX=t{tag}_dev:\n")
    client = redis.Redis.from_url(redis_url)
    try:
        client.mset({f"t{tag}_dev:job:{i}": i for i in range(1500)} | {f"t{tag}:job:{i}": i for i in range(7)})
        result = project.cli("reset", "--env", "dev", "--yes", env={"REDIS_URL": redis_url})
        assert result.code == 0, result.err
        assert f"redis dev: deleted 1500 keys under t{tag}_dev:" in result.out
        # SCAN may return a key more than once while the keyspace is resized: count distinct keys
        assert len(set(client.scan_iter(match=f"t{tag}:*"))) == 7
        assert len(set(client.scan_iter(match=f"t{tag}_dev:*"))) == 0
    finally:
        keys = list(client.scan_iter(match=f"t{tag}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.parametrize("sql,dependent", [
    ("CREATE VIEW public.v_peek AS SELECT id FROM dev.videos", "v_peek"),
    ("CREATE TYPE dev.mood AS ENUM ('ok'); CREATE TABLE public.moods (m dev.mood)", "moods"),
    ("CREATE TABLE public.counter (id bigint DEFAULT nextval('dev.videos_id_seq'))", "counter"),
    ("CREATE TABLE public.refs (v bigint REFERENCES dev.videos (id))", "refs"),
])
def test_reset_refuses_when_something_outside_dev_depends_on_it(project, database, sql: str,
                                                                dependent: str) -> None:
    assert project.cli("migrate", "--env", "dev").code == 0
    database.execute(sql)
    before = database.dump_schema("public")
    result = project.cli("reset", "--env", "dev", "--yes")
    assert result.code == 2
    assert "depend on it" in result.err and dependent in result.err
    assert "videos" in database.tables("dev")
    assert database.dump_schema("public") == before


# --- clone -----------------------------------------------------------------------------------


def test_clone_copies_exact_counts_and_respects_foreign_keys(mongo_server, lib, database, state, populated) -> None:
    result = command.clone(lib, "prod", "dev", sources=populated)
    copied = result.data["copied"]
    prod = counts(database, "public", ("videos", "chunks", "frames", "face_identities"))
    assert {t: copied["postgres"][t] for t in prod} == prod
    assert counts(database, "dev", tuple(prod)) == prod
    assert copied["mongo"]["cache"] == 4 and mongo_server["momentry_dev"].cache.count_documents({}) == 4
    assert copied["qdrant"]["momentry_dev_rule1"] == 30 and qdrant_count(state, "momentry_dev_rule1") == 30
    orphans = database.query("SELECT count(*) FROM dev.chunks c LEFT JOIN dev.videos v ON v.id = c.video_id "
                             "WHERE v.id IS NULL")
    assert orphans == [(0,)]
    database.execute("INSERT INTO dev.videos (source_path) VALUES ('new.mp4')")  # identity continues
    assert counts(database, "public")["videos"] == 3  # the source is untouched


def test_clone_with_a_limit_keeps_foreign_keys_whole(lib, database, populated) -> None:
    result = command.clone(lib, "prod", "dev", stores=["postgres"], limit=1)
    assert result.data["copied"]["postgres"]["videos"] == 1
    assert result.data["copied"]["postgres"]["chunks"] == 1
    (video_id,) = database.query("SELECT id FROM dev.videos")[0]
    assert database.query("SELECT DISTINCT video_id FROM dev.chunks") == [(video_id,)]


def test_clone_through_the_cli_reports_counts(migrated, project, database) -> None:
    database.execute(SAMPLE.format(s="public"))
    database.execute(SAMPLE.format(s="dev"))
    refused = project.cli("clone", "--from", "prod", "--to", "dev", "--tables", "videos,chunks")
    assert refused.code == 2
    assert "add" in refused.err and "frames" in refused.err  # frames would be emptied silently otherwise
    assert counts(database, "dev")["frames"] == 4
    result = project.cli("clone", "--from", "prod", "--to", "dev", "--tables", "file_registry,file_lifecycle",
                         "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["copied"]["postgres"] == {"file_registry": 0, "file_lifecycle": 0}
    everything = project.cli("clone", "--from", "prod", "--to", "dev", "--json")
    assert everything.code == 0, everything.err
    assert {k: v for k, v in json.loads(everything.out)["copied"]["postgres"].items()
            if k in ("videos", "chunks", "frames")} == {"videos": 3, "chunks": 9, "frames": 4}
    assert counts(database, "dev") == {"videos": 3, "chunks": 9, "frames": 4}


@pytest.mark.parametrize("args,message", [
    (["--from", "dev", "--to", "dev"], "both name dev"),
    (["--from", "dev", "--to", "prod"], "never writes into prod"),
    (["--from", "prod", "--to", "dev", "--tables", "videos,nope"], "unknown or shared table(s): nope"),
    (["--from", "prod", "--to", "dev", "--tables", "api_keys"], "unknown or shared table(s): api_keys"),
    (["--from", "prod", "--to", "nowhere"], "unknown environment 'nowhere'"),
    (["--from", "prod", "--to", "dev", "--tables", ","], "--tables names no table"),
    (["--from", "prod", "--to", "dev", "--tables", "videos"], "add chunks"),
])
def test_clone_bad_input_exits_2_and_writes_nothing(migrated, project, database, args, message) -> None:
    database.execute(SAMPLE.format(s="public"))
    before = counts(database, "dev"), counts(database, "public")
    result = project.cli("clone", *args)
    assert result.code == 2
    assert message in result.err
    assert (counts(database, "dev"), counts(database, "public")) == before


# --- adopt -----------------------------------------------------------------------------------


def build_by_plain_sql(database, breakage: str = "") -> None:
    """The Rust service's own SQL: every table and view, no alembic_version."""
    engine = sa.create_engine(database.sa_url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        for view in VIEWS:
            conn.execute(view.to_sql_statement_create())
        if breakage:
            conn.exec_driver_sql(breakage)
    engine.dispose()


def test_adopt_stamps_a_matching_schema(project, database) -> None:
    build_by_plain_sql(database)
    result = project.cli("adopt", "--env", "prod")
    assert result.code == 0, result.out + result.err
    assert "stamped at 0001" in result.out
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]
    again = project.cli("migrate", "--env", "prod", "--store", "postgres")
    assert again.code == 0 and "postgres prod (schema public): up to date (at 0001)" in again.out


@pytest.mark.parametrize("breakage,difference", [
    ("ALTER TABLE videos DROP COLUMN codec", "missing column videos.codec"),
    ("DROP INDEX ix_videos_status", "missing index ix_videos_status on videos"),
])
def test_adopt_refuses_a_schema_that_differs(project, database, breakage: str, difference: str) -> None:
    build_by_plain_sql(database, breakage)
    result = project.cli("adopt", "--env", "prod")
    assert result.code == 1
    assert difference in result.out and "not stamped" in result.out
    assert "alembic_version" not in database.tables("public")
    forced = project.cli("adopt", "--env", "prod", "--force")
    assert forced.code == 0 and "despite the differences" in forced.out
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]


def test_migrate_never_creates_what_an_unadopted_prod_already_has(project, database) -> None:
    build_by_plain_sql(database)
    before = database.dump_schema("public")
    result = project.cli("migrate", "--env", "prod", "--store", "postgres")
    assert result.code == 2
    assert "momentry-db adopt --env prod" in result.err
    assert database.dump_schema("public") == before


def test_adopt_on_a_managed_schema_changes_nothing(project, database) -> None:
    assert project.cli("migrate", "--env", "dev").code == 0
    before = database.dump_schema("dev"), database.query("SELECT * FROM dev.momentry_history ORDER BY id")
    result = project.cli("adopt", "--env", "dev", "--json")
    assert result.code == 0
    text = project.cli("adopt", "--env", "dev")
    assert json.loads(result.out)["stamped"] is False
    assert text.code == 0 and "already managed" in text.out
    assert (database.dump_schema("dev"), database.query("SELECT * FROM dev.momentry_history ORDER BY id")) == before


# --- env-file and envs -----------------------------------------------------------------------


def test_env_file_writes_isolation_variables_and_keeps_the_rest(project) -> None:
    path = project.root / ".env.development"
    path.write_text("# playground settings\nRUST_LOG=debug\nDATABASE_URL=postgres://me@localhost/momentry\n"
                    "MOMENTRY_SERVER_PORT=3003\n")
    check = project.cli("env-file", "--env", "dev", "--check")
    assert check.code == 1 and "DATABASE_SCHEMA: (missing) -> dev" in check.out
    assert path.read_text().count("\n") == 4  # --check wrote nothing
    result = project.cli("env-file", "--env", "dev")
    assert result.code == 0, result.err
    text = path.read_text()
    assert text.startswith("# playground settings\nRUST_LOG=debug\nDATABASE_URL=postgres://me@localhost/momentry\n")
    for line in ("DATABASE_SCHEMA=dev", "MONGODB_DATABASE=momentry_dev", "QDRANT_COLLECTION=momentry_dev_rule1",
                 "MOMENTRY_REDIS_PREFIX=momentry_dev:", "MOMENTRY_WORKER_ENABLED=false"):
        assert line in text.splitlines()
    assert text.count("MOMENTRY_SERVER_PORT") == 1
    assert project.cli("env-file", "--env", "dev", "--check").code == 0


def test_env_file_for_a_declared_environment(project) -> None:
    (project.root / "momentry-db.toml").write_text('[environments]\n"pr-42" = {}\n')
    assert project.cli("env-file", "--env", "pr-42").code == 0
    text = (project.root / ".env.pr-42").read_text()
    assert "DATABASE_SCHEMA=pr_42" in text and "MONGODB_DATABASE=momentry_pr_42" in text


def test_envs_lists_targets_with_secrets_masked(project) -> None:
    (project.root / "momentry-db.toml").write_text('[environments]\n"pr-42" = {}\n')
    result = project.cli("envs", "--json", env={"DATABASE_URL": "postgres://app:pg-s3cret@db/momentry",
                                                "QDRANT_API_KEY": "qk-s3cret"})
    assert result.code == 0
    rows = {r["name"]: r for r in json.loads(result.out)["environments"]}
    assert list(rows) == ["prod", "dev", "pr-42"]
    assert (rows["pr-42"]["schema"], rows["pr-42"]["qdrant_collection"], rows["pr-42"]["redis_prefix"]) == (
        "pr_42", "momentry_pr_42_rule1", "momentry_pr_42:")
    assert rows["dev"]["database_url"] == "postgresql+psycopg://app:***@db/momentry"
    assert "s3cret" not in result.out + result.err
    text = project.cli("envs", env={"DATABASE_URL": "postgres://app:pg-s3cret@db/momentry"})
    assert "pr-42" in text.out and "s3cret" not in text.out


def test_declared_environments_work_with_migrate_and_verify(project, database) -> None:
    (project.root / "momentry-db.toml").write_text('[environments]\n"pr-42" = {}\n')
    for env in ("prod", "pr-42"):
        assert project.cli("migrate", "--env", env).code == 0
    assert "videos" in database.tables("pr_42")
    result = project.cli("verify", "--env", "pr-42")
    assert result.code == 0, result.out
    with pytest.raises(RefusedError, match=r"^reset is refused for prod, whatever the flags"):
        command.resettable(load_project(project.root, project.environ), "prod")


def test_clone_refuses_stores_on_different_servers(project, database) -> None:
    for env in ("prod", "dev"):
        assert project.cli("migrate", "--env", env, "--store", "postgres").code == 0
    database.execute(SAMPLE.format(s="public"))
    (project.root / ".env.development").write_text("QDRANT_URL=http://127.0.0.1:1\n")
    result = project.cli("clone", "--from", "prod", "--to", "dev")
    assert result.code == 2
    assert "different QDRANT_URL settings" in result.err
    assert counts(database, "dev")["videos"] == 0  # refused before any store was written


def test_verify_refuses_an_unknown_store(project) -> None:
    result = project.cli("verify", "--env", "dev", "--store", "postgress")
    assert result.code == 2
    assert "unknown store 'postgress'" in result.err


def test_a_shell_set_up_for_dev_can_still_verify_and_list(project, database) -> None:
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    verify = project.cli("verify", "--env", "dev", "--store", "postgres", env={"DATABASE_SCHEMA": "dev"})
    assert verify.code == 0, verify.out + verify.err
    listing = project.cli("envs", "--json", env={"DATABASE_SCHEMA": "dev"})
    assert listing.code == 0
    assert [r["schema"] for r in json.loads(listing.out)["environments"]] == ["public", "dev"]
    assert "ignored when listing or migrating several" in listing.err
    assert project.cli("status", "--env", "prod", env={"DATABASE_SCHEMA": "dev"}).code == 2  # still refused


def test_unreadable_env_file_and_missing_project_dir_are_bad_input(project, tmp_path) -> None:
    (project.root / ".env.development").write_bytes(b"DATABASE_SCHEMA=\xff\xfe\n")
    result = project.cli("status", "--env", "dev")
    assert result.code == 2 and ".env.development" in result.err
    missing = project.cli("--project-dir", str(tmp_path / "nope"), "status", "--env", "dev")
    assert missing.code == 2 and "does not exist" in missing.err
