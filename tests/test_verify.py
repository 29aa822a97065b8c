"""verify: every isolation violation is created for real and caught."""

from __future__ import annotations

import json

import pytest


def test_a_clean_environment_passes(migrated) -> None:
    result = migrated.cli("verify", "--env", "dev")
    assert result.code == 0, result.out
    assert "FAIL" not in result.out
    assert "ok   postgres dev tables have public's structure: 12 tables compared" in result.out
    assert "n/a  qdrant   momentry_dev_rule1 hnsw, optimizers, payload indexes: local mode ignores them" in result.out
    body = json.loads(migrated.cli("verify", "--env", "dev", "--json").out)
    assert body["ok"] is True
    assert {c["status"] for c in body["checks"]} == {"pass", "not checkable here"}
    assert json.loads(migrated.cli("verify", "--env", "prod", "--json").out)["ok"] is True


@pytest.mark.parametrize("sql,violation", [
    ("CREATE TABLE dev.api_keys (id int)", "shared table api_keys exists in dev"),
    ("CREATE TABLE dev.scratch (id int)", "unexpected table scratch exists in dev"),
    ("CREATE VIEW dev.v_sneaky AS SELECT 1 AS x", "view dev.v_sneaky"),
    ("CREATE SCHEMA other; CREATE TABLE other.monitor_alerts (id int)", "shared table other.monitor_alerts"),
    ("DROP TABLE dev.frames CASCADE", "isolated table frames missing from dev"),
    ("ALTER TABLE dev.frames ADD COLUMN stray text", "frames: column stray only in dev"),
    ("ALTER TABLE dev.videos ALTER COLUMN title TYPE varchar(50)", "videos: column title differs"),
    ("ALTER TABLE dev.videos ALTER COLUMN status DROP DEFAULT", "videos: column status differs"),
    ("DROP INDEX dev.ix_videos_status", "videos: index ix_videos_status missing in dev"),
    ("ALTER TABLE dev.chunks DROP CONSTRAINT uq_chunks_video_id_sequence",
     "chunks: constraint uq_chunks_video_id_sequence missing in dev"),
    ("ALTER TABLE dev.chunks ADD CONSTRAINT sneaky FOREIGN KEY (video_id) REFERENCES public.videos (id)",
     "dev.chunks -> public.videos (sneaky)"),
])
def test_each_postgres_violation_is_caught(migrated, database, sql: str, violation: str) -> None:
    database.execute(sql)
    result = migrated.cli("verify", "--env", "dev", "--store", "postgres")
    assert result.code == 1
    failed = [line for line in result.out.splitlines() if line.startswith("FAIL")]
    assert any(violation in line for line in failed), result.out


@pytest.mark.parametrize("prod_file,dev_file,store,violation", [
    ("MONGODB_DATABASE=shared_db", "MONGODB_DATABASE=shared_db", "mongo", "database 'shared_db' is also prod's"),
    ("QDRANT_COLLECTION=shared_c", "QDRANT_COLLECTION=shared_c", "qdrant", "collection 'shared_c' is also prod's"),
    ("MOMENTRY_REDIS_PREFIX=shared:", "MOMENTRY_REDIS_PREFIX=shared:", "redis", "prefix 'shared:' is also prod's"),
    ("MOMENTRY_REDIS_PREFIX=mm:", "MOMENTRY_REDIS_PREFIX=mm:dev:", "redis",
     "prefix 'mm:dev:' and prod's 'mm:' overlap"),
    ("MOMENTRY_OUTPUT_DIR=/srv/m/out", "MOMENTRY_OUTPUT_DIR=/srv/m/out", "dirs",
     "output dir /srv/m/out is also prod's output dir"),
    ("MOMENTRY_BACKUP_DIR=/srv/m/bak", "MOMENTRY_BACKUP_DIR=/srv/m/bak", "dirs",
     "backup dir /srv/m/bak is also prod's backup dir"),
    ("MOMENTRY_OUTPUT_DIR=/srv/m/out", "MOMENTRY_OUTPUT_DIR=/srv/m/out/dev", "dirs",
     "output dir /srv/m/out/dev and prod's output dir /srv/m/out are nested"),
])
def test_shared_or_nested_names_between_environments_are_caught(project, prod_file: str, dev_file: str,
                                                                 store: str, violation: str) -> None:
    (project.root / ".env").write_text(prod_file + "\n")
    (project.root / ".env.development").write_text(dev_file + "\n")
    result = project.cli("verify", "--env", "dev", "--store", store)
    assert result.code == 1, result.out + result.err
    assert any(violation in line for line in result.out.splitlines() if line.startswith("FAIL")), result.out


def test_an_unreachable_redis_is_a_failed_check_not_a_crash(project) -> None:
    result = project.cli("verify", "--env", "dev", "--store", "redis",
                         env={"REDIS_URL": "redis://:r3dis-pw@127.0.0.1:1/0"})
    assert result.code == 1
    assert "FAIL redis    keys under the prefix: cannot reach redis://:***@127.0.0.1:1/0" in result.out
    assert "r3dis-pw" not in result.out + result.err and "Traceback" not in result.err


@pytest.mark.redis
def test_redis_keys_are_counted_per_prefix(project, redis_url: str) -> None:
    import uuid

    import redis

    tag = uuid.uuid4().hex[:8]
    (project.root / ".env").write_text(f"MOMENTRY_REDIS_PREFIX=t{tag}:\n")
    (project.root / ".env.development").write_text(f"MOMENTRY_REDIS_PREFIX=t{tag}_dev:\n")
    client = redis.Redis.from_url(redis_url)
    try:
        client.mset({f"t{tag}_dev:job:{i}": i for i in range(3)} | {f"t{tag}:job:{i}": i for i in range(2)})
        result = project.cli("verify", "--env", "dev", "--store", "redis", env={"REDIS_URL": redis_url})
        assert result.code == 0, result.out
        assert f"3 keys under t{tag}_dev:" in result.out
    finally:
        client.delete(*client.scan_iter(match=f"t{tag}*"))
        client.close()
