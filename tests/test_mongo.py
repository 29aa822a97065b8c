"""MongoDB runner: logic on mongomock-ng, server behaviour (validators) on a real server when given."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import mongomock_ng
import pytest

from momentry_db import command
from momentry_db.errors import ConfigError, LockTimeoutError, StoreError
from momentry_db.settings import load_project
from momentry_db.stores import mongo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client():
    return mongomock_ng.MongoClient()


@pytest.fixture
def proj(tmp_path: Path):
    return load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})


def target(proj, env: str, client) -> mongo.MongoTarget:
    return mongo.MongoTarget(proj.environment(env), client=client)


def write_migrations(directory: Path, bodies: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (directory / f"{name}.py").write_text(body)
    return directory


COUNTING = '''"""{doc}"""
dependencies = {deps!r}

def upgrade(db):
    db.ran.insert_one({{"name": "{name}"}})
    {extra}

def downgrade(db):
    pass
'''


def counting(name: str, deps: list[str], extra: str = "") -> str:
    return COUNTING.format(doc=f"step {name}", deps=deps, name=name, extra=extra or "pass")


def test_the_project_migrations_load_in_order() -> None:
    names = [m.name for m in mongo.load_migrations()]
    assert names == ["0001_chunks", "0002_cache"]


def test_migrations_land_in_the_env_database_only(proj, client) -> None:
    applied = mongo.apply(target(proj, "dev", client))
    assert [s.name for s in applied] == ["0001_chunks", "0002_cache"]
    dev = client["momentry_dev"]
    assert dev.chunks.index_information()["video_id_sequence"]["unique"] is True
    cache = dev.cache.index_information()
    assert cache["key"]["unique"] is True
    assert cache["expires_at_ttl"]["expireAfterSeconds"] == 0
    assert {d["name"] for d in dev[mongo.STATE_COLLECTION].find()} == {"0001_chunks", "0002_cache"}
    assert "momentry" not in client.list_database_names()
    mongo.apply(target(proj, "prod", client))
    assert "cache" in client["momentry"].list_collection_names()
    assert client["momentry_dev"][mongo.STATE_COLLECTION].count_documents({}) == 2


def test_state_is_readable_by_pymongo_migrate(proj, client) -> None:
    from pymongo_migrate.mongo_migrate import MongoMigrate

    mongo.apply(target(proj, "dev", client))
    mm = MongoMigrate(client, "momentry_dev", migrations_dir=str(REPO / "mongo_migrations"))
    assert all(mm.get_state(m).applied is not None for m in mm.get_migrations())


def test_second_apply_does_nothing(proj, client) -> None:
    mongo.apply(target(proj, "dev", client))
    assert mongo.apply(target(proj, "dev", client)) == []
    assert mongo.plan(target(proj, "dev", client)).pending == ()


def test_dry_run_writes_nothing(proj, client) -> None:
    result = command.migrate(proj, "dev", stores=["mongo"], dry_run=True,
                             sources=command.Sources(mongo_client=client))
    (plan,) = result.targets
    assert [s.name for s in plan.pending] == ["0001_chunks", "0002_cache"]
    assert result.applied == []
    assert client.list_database_names() == []


def test_command_runs_mongo_with_a_progress_event_per_step(proj, client) -> None:
    events = []
    result = command.migrate(proj, "dev", stores=["mongo"], sources=command.Sources(mongo_client=client),
                             emit=lambda e, p: events.append((e, getattr(p, "name", p))))
    assert [s.name for s in result.applied] == ["0001_chunks", "0002_cache"]
    assert ("upgraded", "0001_chunks") in events and ("upgraded", "0002_cache") in events


def test_a_held_lock_makes_the_second_runner_fail_cleanly(proj, client) -> None:
    db = client["momentry_dev"]
    with mongo.migration_lock(db, timeout=1):
        with pytest.raises(LockTimeoutError, match="migration lock held by .*:.*:"):
            mongo.apply(target(proj, "dev", client), lock_timeout=0.3)
        assert db[mongo.STATE_COLLECTION].count_documents({}) == 0
    assert len(mongo.apply(target(proj, "dev", client))) == 2
    assert db[mongo.LOCK_COLLECTION].count_documents({}) == 0  # released


def test_the_second_runner_waits_for_the_lock(proj, client) -> None:
    db = client["momentry_dev"]
    held = threading.Event()

    def holder() -> None:
        with mongo.migration_lock(db, timeout=1):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    started = time.monotonic()
    applied = mongo.apply(target(proj, "dev", client), lock_timeout=10)
    thread.join()
    assert time.monotonic() - started >= 0.3
    assert len(applied) == 2


def test_an_expired_lock_from_a_crashed_run_is_taken_over(proj, client) -> None:
    db = client["momentry_dev"]
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    db[mongo.LOCK_COLLECTION].insert_one({"_id": mongo.LOCK_ID, "owner": "crashed:1:x",
                                          "acquired_at": past, "expires_at": past})
    assert len(mongo.apply(target(proj, "dev", client), lock_timeout=0)) == 2


def test_a_failure_is_recorded_and_a_rerun_resumes(proj, client, tmp_path: Path) -> None:
    d = write_migrations(tmp_path / "m", {
        "0001_a": counting("0001_a", []),
        "0002_b": counting("0002_b", ["0001_a"], extra="raise RuntimeError('disk full')"),
        "0003_c": counting("0003_c", ["0002_b"]),
    })
    t = target(proj, "dev", client)
    with pytest.raises(StoreError) as info:
        mongo.apply(t, mongo.load_migrations(d))
    assert str(info.value) == ("mongo dev (database momentry_dev): migration 0002_b failed: "
                               "RuntimeError: disk full")
    db = client["momentry_dev"]
    assert {d["name"] for d in db[mongo.STATE_COLLECTION].find()} == {"0001_a"}
    failed = db[mongo.HISTORY_COLLECTION].find_one({"outcome": "failed"})
    assert failed["step"] == "0002_b" and "disk full" in failed["error"]

    write_migrations(d, {"0002_b": counting("0002_b", ["0001_a"])})
    applied = mongo.apply(t, mongo.load_migrations(d))
    assert [s.name for s in applied] == ["0002_b", "0003_c"]
    assert sorted(x["name"] for x in db.ran.find()) == ["0001_a", "0002_b", "0002_b", "0003_c"]


@pytest.mark.parametrize("bodies,message", [
    ({"0001_a": '"""x"""\ndef upgrade(db): pass\ndef downgrade(db): pass\n'}, "needs a module-level `dependencies`"),
    ({"0001_a": counting("0001_a", []), "0002_b": counting("0002_b", ["0003_c"]),
      "0003_c": counting("0003_c", ["0002_b"])}, "dependency cycle: 0002_b -> 0003_c -> 0002_b"),
    ({"0001_a": counting("0001_a", ["0009_z"])}, "depends on unknown migration '0009_z'"),
    ({"0001_a": counting("0001_a", []), "0002_b": counting("0002_b", [])}, "exactly one migration"),
    ({"0001_a": "dependencies = []\ndef upgrade(db): pass\n"}, "needs a function downgrade"),
    ({"0001_a": "dependencies = [\n"}, "cannot be imported"),
])
def test_bad_migration_modules_are_clear_errors(tmp_path: Path, bodies: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mongo.load_migrations(write_migrations(tmp_path / "m", bodies))


def test_a_bad_migration_module_stops_the_run_before_any_store_is_touched(project, database,
                                                                          tmp_path: Path) -> None:
    bad = write_migrations(tmp_path / "m", {"0001_a": counting("0001_a", ["0001_a"])})
    proj = load_project(project.root, project.environ)
    with pytest.raises(ConfigError):
        command.migrate(proj, "dev", sources=command.Sources(mongo_migrations=bad,
                                                             mongo_client=mongomock_ng.MongoClient()))
    assert database.tables("dev") == set()


def test_unreachable_mongo_fails_in_one_line_naming_the_store(project, silent_server) -> None:
    port, accepted = silent_server
    started = time.monotonic()
    result = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev",
                                 "--store", "mongo",
                                 env={"MONGODB_URL": f"mongodb://app:m0ngo-pw@127.0.0.1:{port}/?directConnection=true"})
    assert result.code == 1
    lines = [x for x in result.err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: mongo: cannot reach mongodb://app:***@127.0.0.1")
    assert "m0ngo-pw" not in result.out + result.err and "Traceback" not in result.err
    assert time.monotonic() - started < 20
    assert accepted


@pytest.mark.mongo
def test_validator_rejects_a_bad_chunk_on_a_real_server(real_servers, tmp_path: Path) -> None:
    from pymongo.errors import WriteError

    proj = load_project(tmp_path, {"MONGODB_URL": real_servers["MONGODB_URL"],
                                   "MONGODB_DATABASE": f"momentry_test_{int(time.time() * 1000)}"})
    t = mongo.MongoTarget(proj.environment("dev"))
    try:
        mongo.apply(t)
        db = t.client[t.database]
        db.chunks.insert_one({"video_id": 1, "sequence": 0, "start_seconds": 0.0, "end_seconds": 1.0})
        with pytest.raises(WriteError):
            db.chunks.insert_one({"video_id": "not a number", "sequence": 1})
        assert mongo.apply(t) == []
    finally:
        t.client.drop_database(t.database)
        t.close()

