"""verify: every isolation violation is created for real and caught."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from momentry_db.verify import (FAIL, NOT_CHECKABLE, PASS, Check, VerifyResult, _distinct, _structure_diff,
                                check_directories, check_redis)


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
    ("CREATE MATERIALIZED VIEW dev.mv_sneaky AS SELECT 1 AS x", "view dev.mv_sneaky"),
    ("CREATE SCHEMA other; CREATE MATERIALIZED VIEW other.mv_far AS SELECT 1 AS x", "view other.mv_far"),
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


# --- the checks that judge names and directories: pure, table-driven, in both directions ------

def _env(name: str, prefix: str = "", output: str = "/o", backup: str = "/b") -> SimpleNamespace:
    return SimpleNamespace(name=name, redis_prefix=prefix, redis_url=None, output_dir=Path(output),
                           backup_dir=Path(backup))


@pytest.mark.parametrize("mine, theirs, problem", [
    ("mm:dev:", "mm:prod:", None),
    ("mm:", "mm:", "prefix 'mm:' is also other's"),
    ("mm:dev:", "mm:", "prefix 'mm:dev:' and other's 'mm:' overlap (one is a prefix of the other)"),
    ("mm:", "mm:dev:", "prefix 'mm:' and other's 'mm:dev:' overlap (one is a prefix of the other)"),
    ("a:", "ab:", None),
    ("ab:", "a:", None),
])
def test_redis_prefix_check(mine: str, theirs: str, problem: str | None) -> None:
    result = VerifyResult("verify", "me")
    check_redis(result, _env("me", mine), [_env("other", theirs)])
    prefix_check, keys_check = result.checks
    expected = Check("redis", "prefix is distinct and not nested", FAIL, problem) if problem else \
        Check("redis", "prefix is distinct and not nested", PASS, mine)
    assert prefix_check == expected
    assert keys_check == Check("redis", "keys under the prefix", NOT_CHECKABLE, "REDIS_URL is not set")


@pytest.mark.parametrize("mine, theirs, problems", [
    (("/m/out", "/m/bak"), ("/p/out", "/p/bak"), []),
    (("/m/out", "/m/bak"), ("/m/out", "/p/bak"), ["output dir /m/out is also other's output dir"]),
    (("/m/out", "/m/bak"), ("/p/out", "/m/out"), ["output dir /m/out is also other's backup dir"]),
    (("/m/out", "/m/bak"), ("/m/bak", "/p/bak"), ["backup dir /m/bak is also other's output dir"]),
    (("/m/out/dev", "/m/bak"), ("/m/out", "/p/bak"),
     ["output dir /m/out/dev and other's output dir /m/out are nested"]),
    (("/m/out", "/m/bak"), ("/m/out/dev", "/p/bak"),
     ["output dir /m/out and other's output dir /m/out/dev are nested"]),
    (("/m/out", "/m/bak"), ("/p/out", "/m/bak/x"), ["backup dir /m/bak and other's backup dir /m/bak/x are nested"]),
    (("/m/out", "/m/out/bak"), ("/p/out", "/p/bak"), ["output /m/out and backup /m/out/bak overlap"]),
    (("/m/out/bak", "/m/out"), ("/p/out", "/p/bak"), ["output /m/out/bak and backup /m/out overlap"]),
    (("/m/out", "/m/outer"), ("/m/outx", "/p/bak"), []),
])
def test_directory_check(mine: tuple[str, str], theirs: tuple[str, str], problems: list[str]) -> None:
    result = VerifyResult("verify", "me")
    check_directories(result, _env("me", output=mine[0], backup=mine[1]),
                      [_env("other", output=theirs[0], backup=theirs[1])])
    (check,) = result.checks
    name = "output and backup dirs are distinct and not nested"
    assert check == (Check("dirs", name, FAIL, "; ".join(problems)) if problems
                     else Check("dirs", name, PASS, f"{mine[0]}, {mine[1]}"))


@pytest.mark.parametrize("values, status", [({"me": "x", "other": "y"}, PASS), ({"me": "x", "other": "x"}, FAIL)])
def test_a_name_shared_with_another_environment_fails(values: dict[str, str], status: str) -> None:
    result = VerifyResult("verify", "me")
    _distinct(result, "mongo", "database", _env("me"), [_env("other")], lambda e: values[e.name])
    assert result.checks == [Check("mongo", "database differs from other environments'", status,
                                   "database 'x' is also other's" if status == FAIL else "x")]
    assert result.ok is (status == PASS)
    assert result.failures == ([] if status == PASS else result.checks)


def test_a_check_lists_ten_problems_and_counts_the_rest() -> None:
    result = VerifyResult("verify", "me")
    result.add("s", "n", [f"p{i}" for i in range(13)])
    assert result.checks == [Check("s", "n", FAIL, "; ".join(f"p{i}" for i in range(10)) + "; and 3 more")]
    result.add("s", "m", [f"p{i}" for i in range(10)])
    assert result.checks[1].detail == "; ".join(f"p{i}" for i in range(10))
    result.add("s", "o", ["p"], status=NOT_CHECKABLE, detail="why")
    assert result.checks[2] == Check("s", "o", NOT_CHECKABLE, "why")
    assert result.to_json() == {"command": "verify", "env": "me", "envs": ["me"], "ok": False, "failed": ["me"],
                                "notices": [], "checks": [{"env": "me", **c.to_json()} for c in result.checks]}
    assert result.checks[2].to_json() == {"store": "s", "name": "o", "status": NOT_CHECKABLE, "detail": "why"}


def test_structure_differences_are_named_each_way() -> None:
    public = {"t": {"column a": ("int",), "column b": ("int",), "index i": ("x",)}, "only_public": {}}
    mine = {"t": {"column a": ("text",), "column c": ("int",), "index i": ("x",)}, "only_mine": {}}
    assert _structure_diff(public, mine, "dev") == [
        "t: column a differs (text in dev, int in public)",
        "t: column b missing in dev",
        "t: column c only in dev",
    ]
    assert _structure_diff(public, public, "dev") == []


@pytest.mark.parametrize("counted, check", [
    (lambda url, prefix: 7, Check("redis", "keys under the prefix", PASS, "7 keys under mm:dev:")),
    (None, Check("redis", "keys under the prefix", FAIL,
                 "cannot reach redis://:***@127.0.0.1:1/0: connection refused to redis://:***@127.0.0.1:1/0")),
])
def test_redis_keys_are_counted_under_the_environments_own_prefix(monkeypatch, counted, check: Check) -> None:
    from momentry_db.environments import SecretURL
    from momentry_db.stores import redis as redis_store

    url = "redis://:r3dis-pw@127.0.0.1:1/0"
    calls = []

    def count_keys(given_url: str, prefix: str) -> int:
        calls.append((given_url, prefix))
        if counted is None:
            raise ConnectionError(f"connection refused to {url}")
        return counted(given_url, prefix)

    monkeypatch.setattr(redis_store, "count_keys", count_keys)
    me = _env("me", "mm:dev:")
    me.redis_url = SecretURL(url)
    me.secrets = lambda: [me.redis_url]
    result = VerifyResult("verify", "me")
    check_redis(result, me, [_env("other", "mm:prod:")])
    assert calls == [(url, "mm:dev:")]
    assert result.checks[1] == check


def test_a_passing_check_has_no_detail_unless_given() -> None:
    result = VerifyResult("verify", "me")
    result.add("s", "passes", [])
    result.add("s", "n/a", status=NOT_CHECKABLE)
    assert result.checks == [Check("s", "passes", PASS, ""), Check("s", "n/a", NOT_CHECKABLE, "")]


def test_a_passing_result_lists_no_failed_environment() -> None:
    result = VerifyResult("verify", "me")
    result.add("s", "passes", [])
    assert result.to_json() == {"command": "verify", "env": "me", "envs": ["me"], "ok": True, "failed": [],
                                "notices": [], "checks": [{"env": "me", "store": "s", "name": "passes",
                                                           "status": PASS, "detail": ""}]}


def test_structure_values_are_shown_joined_by_spaces() -> None:
    assert _structure_diff({"t": {"column a": ("integer", "NO")}}, {"t": {"column a": ("text", "YES")}}, "dev") == [
        "t: column a differs (text YES in dev, integer NO in public)"]
