"""Mongo drift on a real server (SecantusDB): the shape each migration leaves is recorded, and
check / verify report every missing, extra or changed index or validator against it, and dev against prod."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Project
from pymongo import MongoClient

REF = "the shape recorded at 0002_cache"
CHUNKS_SHAPE = {
    "indexes": {
        "created_at": {"key": [["created_at", 1]]},
        "video_id_sequence": {"key": [["video_id", 1], ["sequence", 1]], "unique": True},
    },
    "validator": {
        "validator": {"$jsonSchema": {
            "bsonType": "object",
            "required": ["video_id", "sequence", "start_seconds", "end_seconds"],
            "properties": {
                "video_id": {"bsonType": ["int", "long"], "description": "videos.id in the same environment"},
                "sequence": {"bsonType": ["int", "long"], "minimum": 0},
                "start_seconds": {"bsonType": ["double", "int", "long"], "minimum": 0},
                "end_seconds": {"bsonType": ["double", "int", "long"], "minimum": 0},
                "text": {"bsonType": "string"},
                "created_at": {"bsonType": "date"},
            }}},
        "validationLevel": "moderate",
        "validationAction": "error",
    },
}
CACHE_SHAPE = {"indexes": {"expires_at_ttl": {"key": [["expires_at", 1]], "expireAfterSeconds": 0},
                           "key": {"key": [["key", 1]], "unique": True}}}


@pytest.fixture
def client(fresh_mongo_url: str) -> Iterator[MongoClient]:
    c = MongoClient(fresh_mongo_url)
    yield c
    c.close()


@pytest.fixture
def mproject(tmp_path: Path, fresh_mongo_url: str) -> Project:
    """A project on this test's own server, with the default database names (momentry, momentry_dev)."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, {"MONGODB_URL": fresh_mongo_url, "MOMENTRY_EMBEDDED": "off",
                          "MOMENTRY_STATE_DIR": str(tmp_path / "state")})


@pytest.fixture
def migrated(mproject: Project) -> Project:
    for env in ("prod", "dev"):
        result = mproject.cli("migrate", "--env", env, "--store", "mongo")
        assert result.code == 0, result.err
    return mproject


def check_json(project: Project, env: str = "dev") -> tuple[int, dict]:
    result = project.cli("check", "--env", env, "--store", "mongo", "--json")
    return result.code, json.loads(result.out)


def verify_checks(project: Project, env: str = "dev") -> tuple[int, dict[str, tuple[str, str]]]:
    result = project.cli("verify", "--env", env, "--store", "mongo", "--json")
    body = json.loads(result.out)
    return result.code, {c["name"]: (c["status"], c["detail"]) for c in body["checks"]}


def snapshot(client: MongoClient, database: str) -> dict:
    """Every document, index and collection option of a database, to compare before and after."""
    db = client[database]
    return {info["name"]: (info.get("options"), list(db[info["name"]].find({}, sort=[("_id", 1)])),
                           sorted(map(str, db[info["name"]].list_indexes())))
            for info in db.list_collections()}


def test_each_applied_migration_records_the_shape_it_left(migrated, client) -> None:
    for database in ("momentry", "momentry_dev"):
        recorded = {d["_id"]: json.loads(d["shape"]) for d in client[database].momentry_migrate_shape.find()}
        assert recorded == {"0001_chunks": {"chunks": CHUNKS_SHAPE},
                            "0002_cache": {"chunks": CHUNKS_SHAPE, "cache": CACHE_SHAPE}}
        # pymongo-migrate's state collection keeps its own shape, so its CLI still reads it.
        assert [sorted(d) for d in client[database].pymongo_migrate.find({}, {"_id": 0})] == [["applied", "name"]] * 2


def test_a_freshly_migrated_database_shows_no_drift(migrated) -> None:
    result = migrated.cli("check", "--env", "dev", "--store", "mongo")
    assert (result.code, result.out) == (0, "check dev: every store at head, no drift\n")
    code, body = check_json(migrated, "prod")
    assert (code, body["ok"], body["drift"]) == (0, True, [])
    code, checks = verify_checks(migrated)
    assert code == 0
    assert checks["database momentry_dev has the shape recorded at its head"] == ("pass", "at 0002_cache")
    assert checks["database momentry_dev has prod's shape (momentry)"] == ("pass", "both at 0002_cache")
    code, checks = verify_checks(migrated, "prod")
    assert code == 0
    assert checks["database momentry has the shape recorded at its head"] == ("pass", "at 0002_cache")
    assert not any("prod's shape" in name for name in checks)  # prod is the reference, not compared to itself


def test_an_index_dropped_by_hand_fails_check_and_verify_naming_it(migrated, client) -> None:
    client.momentry_dev.chunks.drop_index("created_at")
    before = snapshot(client, "momentry_dev")
    line = (f'momentry_dev.chunks: index created_at missing; {REF} has it (key {{"created_at": 1}})')

    result = migrated.cli("check", "--env", "dev", "--store", "mongo")
    assert result.code == 1
    assert result.out.splitlines() == [f"drift: mongo dev (database momentry_dev): {line}",
                                       "check dev: 0 pending step(s), 1 drift(s)"]
    code, body = check_json(migrated)
    assert (code, body["ok"], body["drift"]) == (1, False, [f"mongo dev (database momentry_dev): {line}"])

    proc = migrated.momentry_db("verify", "--env", "dev", "--store", "mongo")
    assert proc.code == 1
    assert f"FAIL mongo    database momentry_dev has the shape recorded at its head: {line}" in proc.out.splitlines()
    code, checks = verify_checks(migrated)
    assert code == 1
    assert checks["database momentry_dev has the shape recorded at its head"] == ("fail", line)
    assert checks["database momentry_dev has prod's shape (momentry)"] == (
        "fail", 'momentry_dev.chunks: index created_at missing; prod\'s momentry has it (key {"created_at": 1})')

    assert snapshot(client, "momentry_dev") == before  # check and verify only read
    assert check_json(migrated, "prod")[0] == 0  # prod is untouched and still clean


@pytest.mark.parametrize("tamper, drift", [
    (lambda db: db.chunks.create_index([("text", 1), ("video_id", -1)], name="by_text", sparse=True),
     [f'momentry_dev.chunks: extra index by_text (key {{"text": 1, "video_id": -1}}), not in {REF}']),
    (lambda db: db.command("collMod", "cache", index={"name": "expires_at_ttl", "expireAfterSeconds": 3600}),
     [f"momentry_dev.cache: index expires_at_ttl differs: expireAfterSeconds is 3600, {REF} has 0"]),
    (lambda db: (db.cache.drop_index("key"), db.cache.create_index("key", name="key")),
     [f"momentry_dev.cache: index key differs: unique is unset, {REF} has true"]),
    (lambda db: (db.cache.drop_index("key"), db.cache.create_index([("key", -1)], name="key", unique=True)),
     [f'momentry_dev.cache: index key differs: key is {{"key": -1}}, {REF} has {{"key": 1}}']),
    (lambda db: db.command("collMod", "chunks", validator={}),
     [f"momentry_dev.chunks: validator missing; {REF} has one"]),
    (lambda db: db.command("collMod", "chunks", validator={"$jsonSchema": {"bsonType": "object",
                                                                           "required": ["video_id"]}}),
     [f"momentry_dev.chunks: validator differs at $jsonSchema.required from {REF}"]),
    (lambda db: db.command("collMod", "chunks", validationLevel="strict", validationAction="warn"),
     [f"momentry_dev.chunks: validationLevel is strict, {REF} has moderate",
      f"momentry_dev.chunks: validationAction is warn, {REF} has error"]),
    (lambda db: db.command("collMod", "cache", validator={"key": {"$type": "string"}}),
     [f"momentry_dev.cache: extra validator, not in {REF}"]),
], ids=["extra index", "changed ttl", "unique dropped", "key changed", "validator removed", "validator changed",
        "level and action", "extra validator"])
def test_each_index_or_validator_change_is_drift(migrated, client, tamper, drift) -> None:
    tamper(client.momentry_dev)
    code, body = check_json(migrated)
    assert (code, body["drift"]) == (1, [f"mongo dev (database momentry_dev): {d}" for d in drift])
    code, checks = verify_checks(migrated)
    assert code == 1
    assert checks["database momentry_dev has the shape recorded at its head"] == ("fail", "; ".join(drift))


def test_a_collection_the_application_creates_by_writing_is_not_drift(migrated, client) -> None:
    client.momentry_dev.videos_seen.insert_one({"video_id": 1})
    assert check_json(migrated)[0] == 0
    client.momentry_dev.videos_seen.create_index("video_id", name="video_id")
    code, body = check_json(migrated)
    assert (code, body["drift"]) == (1, [("mongo dev (database momentry_dev): momentry_dev.videos_seen: extra index "
                                          f'video_id (key {{"video_id": 1}}), not in {REF}')])


def test_verify_reports_where_dev_and_prod_shapes_differ(migrated, client) -> None:
    # prod drifted, dev did not: dev matches its record but no longer prod's shape.
    client.momentry.chunks.drop_index("created_at")
    client.momentry.command("collMod", "cache", index={"name": "expires_at_ttl", "expireAfterSeconds": 60})
    code, checks = verify_checks(migrated)
    assert code == 1
    assert checks["database momentry_dev has the shape recorded at its head"] == ("pass", "at 0002_cache")
    assert checks["database momentry_dev has prod's shape (momentry)"] == (
        "fail", ("momentry_dev.cache: index expires_at_ttl differs: expireAfterSeconds is 0, prod's momentry has 60; "
                 'momentry_dev.chunks: extra index created_at (key {"created_at": 1}), not in prod\'s momentry'))
    assert check_json(migrated)[0] == 0  # check compares each database with its own record only


def test_dev_and_prod_at_different_heads_are_not_compared(mproject, client) -> None:
    assert mproject.cli("migrate", "--env", "dev", "--store", "mongo").code == 0
    code, checks = verify_checks(mproject)
    assert code == 0
    assert checks["database momentry_dev has prod's shape (momentry)"] == (
        "not checkable here", "prod is at none, dev at 0002_cache; migrate both to compare")
    assert "momentry" not in client.list_database_names()  # verify did not create prod's database


def test_a_database_migrated_before_shapes_were_recorded_is_not_checkable_until_migrate(migrated, client) -> None:
    client.momentry_dev.drop_collection("momentry_migrate_shape")
    for database in ("momentry_dev", "momentry"):  # drift that predates dev's baseline, alike in prod
        client[database].chunks.drop_index("created_at")
    before = snapshot(client, "momentry_dev")
    why = ("no shape recorded at 0002_cache (migrated before shapes were recorded); "
           "run momentry-db migrate --env dev to record the live one as its baseline")

    code, body = check_json(migrated)
    assert (code, body["ok"], body["drift"]) == (1, False, [f"mongo dev (database momentry_dev): not checkable: {why}"])
    code, checks = verify_checks(migrated)
    assert code == 0  # not a failure, and not a pass either
    assert checks["database momentry_dev has the shape recorded at its head"] == ("not checkable here", why)
    assert snapshot(client, "momentry_dev") == before  # neither check nor verify records anything

    result = migrated.cli("migrate", "--env", "dev", "--store", "mongo")
    assert result.code == 0
    assert ("mongo dev (database momentry_dev): no shape was recorded at 0002_cache (migrated before shapes were "
            "recorded); recorded the live indexes and validators as its baseline") in result.err + result.out
    assert [d["_id"] for d in client.momentry_dev.momentry_migrate_shape.find()] == ["0002_cache"]
    code, body = check_json(migrated)
    assert (code, body["ok"], body["drift"]) == (0, True, [])
    again = migrated.cli("migrate", "--env", "dev", "--store", "mongo")
    assert "baseline" not in again.err + again.out  # recorded once


def test_check_compares_shapes_only_once_the_database_is_at_head(mproject, client) -> None:
    assert mproject.cli("migrate", "--env", "dev", "--store", "mongo").code == 0
    client.momentry_dev.pymongo_migrate.delete_one({"name": "0002_cache"})  # 0002_cache pending again
    code, body = check_json(mproject)
    assert (code, body["drift"], [s["name"] for s in body["pending"]]) == (1, [], ["0002_cache"])
    assert body["notices"] == ["mongo: drift is compared once the database is at head; migrate, then check again"]
