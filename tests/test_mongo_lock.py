"""The MongoDB migration lock on a real server: lease, heartbeat, takeover, release, unlock."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from momentry_db.errors import LockTimeoutError, StoreError
from momentry_db.settings import load_project
from momentry_db.stores import mongo

SLOW = '''"""step {name}"""
import pathlib, time
dependencies = {deps!r}

def upgrade(db):
    db.ran.insert_one({{"name": "{name}"}})
    hold = pathlib.Path({hold!r})
    deadline = time.monotonic() + 60
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

def downgrade(db):
    pass
'''


def migration(name: str, deps: list[str], body: str = "pass", hold: Path | None = None) -> str:
    if hold is not None:
        return SLOW.format(name=name, deps=deps, hold=str(hold))
    return (f'"""step {name}"""\nimport sys\ndependencies = {deps!r}\n\ndef upgrade(db):\n'
            f'    db.ran.insert_one({{"name": "{name}"}})\n    {body}\n\ndef downgrade(db):\n    pass\n')


def write(directory: Path, bodies: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (directory / f"{name}.py").write_text(body)
    return directory


@pytest.fixture
def client(mongo_url: str):
    c = MongoClient(mongo_url, tz_aware=True)
    yield c
    c.close()


@pytest.fixture
def db(client, mongo_db_name: str):
    return client[mongo_db_name]


@pytest.fixture
def target(tmp_path: Path, mongo_url: str, mongo_db_name: str):
    proj = load_project(tmp_path, {"MONGODB_URL": mongo_url, "MONGODB_DATABASE": mongo_db_name,
                                   "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    t = mongo.MongoTarget(proj.environment("dev"))
    yield t
    t.close()


def lock_doc(db) -> dict | None:
    return db[mongo.LOCK_COLLECTION].find_one({"_id": mongo.LOCK_ID})


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_lock(db, *, owner: str, host: str, pid: int, minutes: float = 10) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    db[mongo.LOCK_COLLECTION].insert_one({"_id": mongo.LOCK_ID, "owner": owner, "host": host, "pid": pid,
                                          "acquired_at": now, "expires_at": now + dt.timedelta(minutes=minutes)})


def applied(db) -> set[str]:
    return {d["name"] for d in db[mongo.STATE_COLLECTION].find({"applied": {"$ne": None}})}


def test_the_default_lease_frees_a_dead_runs_lock_within_30_seconds() -> None:
    assert mongo.LOCK_LEASE == dt.timedelta(seconds=30)


def test_the_live_run_renews_its_lease_past_its_length(db) -> None:
    lease = dt.timedelta(seconds=0.6)
    with mongo.migration_lock(db, timeout=0, lease=lease) as held:
        first = lock_doc(db)
        assert first["owner"] == held.owner
        assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
        time.sleep(1.5)  # over twice the lease: without renewal another run could take it now
        second = lock_doc(db)
        assert second["owner"] == held.owner
        assert second["expires_at"] > first["expires_at"]
        assert second["expires_at"] > dt.datetime.now(dt.timezone.utc)
        with pytest.raises(LockTimeoutError, match=f"held by {held.owner} since"):
            with mongo.migration_lock(db, timeout=0, lease=lease):
                pass
        held.check()  # still ours
    assert lock_doc(db) is None


def test_a_run_never_releases_another_runs_lock(db) -> None:
    with mongo.migration_lock(db, timeout=0, lease=dt.timedelta(minutes=1)) as held:
        # Another run took the lock over (as after a missed renewal, or after unlock).
        db[mongo.LOCK_COLLECTION].update_one({"_id": mongo.LOCK_ID}, {"$set": {"owner": "elsewhere:7:other"}})
        assert held.renew() is False
        with pytest.raises(mongo.LockLost, match="now held by elsewhere:7:other"):
            held.check()
    assert lock_doc(db)["owner"] == "elsewhere:7:other"
    assert mongo.release(db, held.owner) is False
    assert lock_doc(db)["owner"] == "elsewhere:7:other"


def test_a_run_that_lost_its_lock_stops_before_the_next_step(target, db, tmp_path: Path) -> None:
    steal = ("db[\"momentry_migrate_lock\"].update_one({\"_id\": \"migrate\"}, "
             "{\"$set\": {\"owner\": \"thief:1:x\"}}); import time; time.sleep(0.5)")
    d = write(tmp_path / "m", {"0001_a": migration("0001_a", [], steal),
                               "0002_b": migration("0002_b", ["0001_a"])})
    with pytest.raises(StoreError) as info:
        mongo.apply(target, mongo.load_migrations(d), lease=dt.timedelta(seconds=0.3))
    assert str(info.value).startswith(f"mongo dev (database {db.name}): migration 0002_b failed: lost the "
                                      "migration lock (it is now held by thief:1:x since")
    assert applied(db) == {"0001_a"}
    assert [x["name"] for x in db.ran.find()] == ["0001_a"]  # 0002_b never started
    assert lock_doc(db)["owner"] == "thief:1:x"  # and its lock was left alone


def test_a_lock_released_under_a_run_stops_it_before_its_next_step_at_once(target, db, tmp_path: Path) -> None:
    """An unlock --yes from elsewhere is seen before the next step, not at the next heartbeat."""
    release = 'db["momentry_migrate_lock"].delete_one({"_id": "migrate"})'
    d = write(tmp_path / "m", {"0001_a": migration("0001_a", [], release),
                               "0002_b": migration("0002_b", ["0001_a"])})
    with pytest.raises(StoreError) as info:
        mongo.apply(target, mongo.load_migrations(d))  # the default 30 s lease: no heartbeat in between
    assert str(info.value) == (f"mongo dev (database {db.name}): migration 0002_b failed: lost the migration lock "
                               "(it was released by another process (momentry-db unlock?)); not started. Rerun "
                               "migrate once the other run is done")
    assert applied(db) == {"0001_a"}
    assert [x["name"] for x in db.ran.find()] == ["0001_a"]


def test_a_lock_whose_process_on_this_host_is_gone_is_taken_over_at_once(target, db) -> None:
    plant_lock(db, owner=f"{socket.gethostname()}:1:dead", host=socket.gethostname(), pid=dead_pid())
    started = time.monotonic()
    assert [s.name for s in mongo.apply(target, lock_timeout=0)] == ["0001_chunks", "0002_cache"]
    assert time.monotonic() - started < 5
    assert lock_doc(db) is None


def test_a_live_or_remote_holder_is_waited_for(target, db) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        plant_lock(db, owner="here:live", host=socket.gethostname(), pid=sleeper.pid)
        with pytest.raises(LockTimeoutError, match="held by here:live since .*momentry-db unlock --env dev "
                                                   "--store mongo"):
            mongo.apply(target, lock_timeout=0.3)
    finally:
        sleeper.kill()
        sleeper.wait()
    db[mongo.LOCK_COLLECTION].delete_many({})
    plant_lock(db, owner="otherhost:1:x", host="another-host.invalid", pid=dead_pid())
    with pytest.raises(LockTimeoutError, match="held by otherhost:1:x"):
        mongo.apply(target, lock_timeout=0.3)
    assert applied(db) == set()


def test_an_expired_lease_is_taken_over(target, db) -> None:
    plant_lock(db, owner="otherhost:1:x", host="another-host.invalid", pid=1, minutes=-0.01)
    assert len(mongo.apply(target, lock_timeout=0)) == 2


def test_a_rerun_after_sigkill_mid_migration_converges_without_a_manual_step(mongo_project, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    write(mongo_project.root / "mongo_migrations", {
        "0001_a": migration("0001_a", []),
        "0002_slow": migration("0002_slow", ["0001_a"], hold=hold),
        "0003_c": migration("0003_c", ["0002_slow"]),
    })
    argv = [sys.executable, "-m", "momentry_db.cli", "--project-dir", str(mongo_project.root),
            "migrate", "--env", "dev", "--store", "mongo"]
    client = MongoClient(mongo_project.environ["MONGODB_URL"], tz_aware=True)
    db = client[mongo_project.environ["MONGODB_DATABASE"]]
    proc = subprocess.Popen(argv, cwd=mongo_project.root, env=mongo_project.run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while db.ran.find_one({"name": "0002_slow"}) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the first run never reached 0002_slow"
            time.sleep(0.05)
        assert lock_doc(db)["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert applied(db) == {"0001_a"}
    hold.unlink()

    started = time.monotonic()
    rerun = mongo_project.momentry_db("--project-dir", str(mongo_project.root), "migrate", "--env", "dev",
                                      "--store", "mongo")
    assert rerun.code == 0, rerun.err
    assert time.monotonic() - started < 60
    assert applied(db) == {"0001_a", "0002_slow", "0003_c"}
    assert [x["name"] for x in db.ran.find()] == ["0001_a", "0002_slow", "0002_slow", "0003_c"]
    assert lock_doc(db) is None
    client.close()


def test_sys_exit_in_a_migration_is_a_store_failure_naming_it(mongo_project) -> None:
    write(mongo_project.root / "mongo_migrations", {
        "0001_a": migration("0001_a", []),
        "0002_b": migration("0002_b", ["0001_a"], "sys.exit(3)"),
    })
    result = mongo_project.momentry_db("--project-dir", str(mongo_project.root), "migrate", "--env", "dev",
                                       "--store", "mongo")
    name = mongo_project.environ["MONGODB_DATABASE"]
    assert result.code == 1
    assert [x for x in result.err.splitlines() if x.startswith("error:")] == [
        f"error: mongo dev (database {name}): migration 0002_b failed: called sys.exit(3)"]
    client = MongoClient(mongo_project.environ["MONGODB_URL"], tz_aware=True)
    db = client[name]
    assert applied(db) == {"0001_a"}
    assert db[mongo.HISTORY_COLLECTION].find_one({"step": "0002_b"}, {"_id": 0, "outcome": 1, "error": 1}) == {
        "outcome": "failed", "error": "called sys.exit(3)"}
    assert lock_doc(db) is None
    client.close()


def test_an_interrupt_stops_the_run_records_it_and_releases_the_lock(target, db, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"0001_a": migration("0001_a", [], "raise KeyboardInterrupt"),
                               "0002_b": migration("0002_b", ["0001_a"])})
    with pytest.raises(KeyboardInterrupt):
        mongo.apply(target, mongo.load_migrations(d))
    assert applied(db) == set()
    assert db[mongo.HISTORY_COLLECTION].find_one({"step": "0001_a"})["outcome"] == "failed"
    assert [x["name"] for x in db.ran.find()] == ["0001_a"]
    assert lock_doc(db) is None


def test_unlock_shows_the_holder_and_needs_yes(mongo_project) -> None:
    client = MongoClient(mongo_project.environ["MONGODB_URL"], tz_aware=True)
    db = client[mongo_project.environ["MONGODB_DATABASE"]]
    plant_lock(db, owner="ci-runner-3:4242:ab12cd34", host="ci-runner-3", pid=4242)
    before = lock_doc(db)

    refused = mongo_project.cli("unlock", "--env", "dev", "--store", "mongo")
    assert refused.code == 2
    assert refused.err.startswith(f"error: mongo dev (database {db.name}): migration lock held by "
                                  "ci-runner-3:4242:ab12cd34 since ")
    assert "its lease is live" in refused.err and "--store mongo --yes" in refused.err
    assert len(refused.err.splitlines()) == 1
    assert lock_doc(db) == before

    released = mongo_project.cli("unlock", "--env", "dev", "--store", "mongo", "--yes")
    assert released.code == 0, released.err
    assert released.out.startswith(f"mongo dev (database {db.name}): released the migration lock held by "
                                   "ci-runner-3:4242:ab12cd34 since ")
    assert lock_doc(db) is None

    again = mongo_project.cli("unlock", "--env", "dev", "--store", "mongo", "--yes")
    assert (again.code, again.out) == (0, "mongo dev: no migration lock held\n")
    client.close()


def test_unlock_rejects_an_unknown_store_and_env(mongo_project) -> None:
    bad_store = mongo_project.cli("unlock", "--env", "dev", "--store", "redis")
    assert bad_store.code == 2 and "'redis' is not one of" in bad_store.err
    bad_env = mongo_project.cli("unlock", "--env", "staging", "--store", "mongo", "--yes")
    assert bad_env.code == 2 and bad_env.err.startswith("error: unknown environment 'staging'")


def test_a_crashed_run_on_another_host_is_taken_over_when_its_lease_runs_out(target, db) -> None:
    plant_lock(db, owner="otherhost:1:x", host="another-host.invalid", pid=1, minutes=1.5 / 60)
    started = time.monotonic()
    assert len(mongo.apply(target, lock_timeout=10)) == 2
    assert 1.0 < time.monotonic() - started < 5
    assert lock_doc(db) is None


def test_a_renewal_that_keeps_failing_loses_the_lease_once_it_has_run_out(db) -> None:
    with mongo.migration_lock(db, timeout=0, lease=dt.timedelta(minutes=1)) as held:
        renewals = held.locks
        held.locks = None  # every renewal now fails, as on a lost connection
        assert held.renew() is True  # still inside the lease: keep trying
        held.expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        assert held.renew() is False
        with pytest.raises(mongo.LockLost, match="the lease ran out while it could not be renewed"):
            held.check()
        held.locks = renewals
    assert lock_doc(db) is None  # released: the document was still ours
