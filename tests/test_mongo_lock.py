"""The MongoDB migration lock on a real server: lease, heartbeat, takeover, release, unlock."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pymongo import MongoClient

from momentry_db.errors import LockTimeoutError, StoreError
from momentry_db.settings import load_project
from momentry_db.stores import mongo
from tests.helpers import live_process, wait_until

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


class FakeClock(mongo.Clock):
    """The lock's clock in a test: sleeping moves it forward at once, and every pause is recorded.

    It starts a day ahead, so the leases it stamps lie in the server's future and the server's TTL
    index never removes a lock while a test looks at it.
    """

    def __init__(self) -> None:
        self.start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
        self.elapsed = 0.0
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.elapsed += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(mongo, "clock", fake)
    return fake


def plant_lock(db, *, owner: str, host: str, pid: int, minutes: float = 10, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    db[mongo.LOCK_COLLECTION].insert_one({"_id": mongo.LOCK_ID, "owner": owner, "host": host, "pid": pid,
                                          "acquired_at": now, "expires_at": now + dt.timedelta(minutes=minutes)})


def applied(db) -> set[str]:
    return {d["name"] for d in db[mongo.STATE_COLLECTION].find({"applied": {"$ne": None}})}


def test_the_default_lease_frees_a_dead_runs_lock_within_30_seconds() -> None:
    assert mongo.LOCK_LEASE == dt.timedelta(seconds=30)


def test_the_live_run_renews_its_lease_past_its_length(db, monkeypatch) -> None:
    lease = dt.timedelta(seconds=1.5)  # the heartbeat renews every 0.5 s
    beats = threading.Semaphore(0)
    seen: list[dict] = []  # the lock as each heartbeat left it
    real_renew = mongo.Lease.renew

    def renew(self) -> bool:
        renewed = real_renew(self)
        if threading.current_thread() is not threading.main_thread():  # the heartbeat, not a check()
            seen.append(lock_doc(db))
            beats.release()
        return renewed

    monkeypatch.setattr(mongo.Lease, "renew", renew)
    with mongo.migration_lock(db, timeout=0, lease=lease) as held:
        first = lock_doc(db)
        assert first["owner"] == held.owner
        assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
        assert [t.daemon for t in threading.enumerate() if t.name == f"mongo-lock-{held.owner}"] == [True]
        assert beats.acquire(timeout=10) and beats.acquire(timeout=10), "the heartbeat did not keep renewing"
        second = lock_doc(db)
        assert second["owner"] == held.owner and second["acquired_at"] == first["acquired_at"]
        assert first["acquired_at"] < seen[0]["renewed_at"] < first["expires_at"]  # renewed within the lease
        assert second["expires_at"] > first["expires_at"]  # and pushed past it
        assert held.expires_at > first["expires_at"]
        with pytest.raises(LockTimeoutError, match=f"held by {held.owner} since"):
            with mongo.migration_lock(db, timeout=0, lease=lease):
                pass
        held.check()  # still ours
    assert lock_doc(db) is None


def test_release_removes_the_lock_only_for_its_owner(db) -> None:
    plant_lock(db, owner="ci-7:42:a", host="h", pid=42)
    assert mongo.release(db, "ci-7:42:b") is False
    assert lock_doc(db)["owner"] == "ci-7:42:a"
    assert mongo.release(db, "ci-7:42:a") is True
    assert lock_doc(db) is None
    assert mongo.release(db, "ci-7:42:a") is False


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
    # The step hands the lock to another owner, then waits for the heartbeat to see it: the heartbeat
    # thread ends at the renewal that finds the lock gone (the join's bound only keeps a failure from hanging).
    steal = ("db[\"momentry_migrate_lock\"].update_one({\"_id\": \"migrate\"}, "
             "{\"$set\": {\"owner\": \"thief:1:x\"}}); import threading; "
             "[t.join(60) for t in threading.enumerate() if t.name.startswith(\"mongo-lock-\")]")
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
    # No wait at all: with a lock timeout of 0 a lock that is not taken over on the first look fails.
    assert [s.name for s in mongo.apply(target, lock_timeout=0)] == ["0001_chunks", "0002_cache"]
    assert lock_doc(db) is None


def test_a_live_or_remote_holder_is_waited_for(target, db, clock: FakeClock) -> None:
    with live_process() as holder:
        plant_lock(db, owner="here:live", host=socket.gethostname(), pid=holder.pid, now=clock.now())
        with pytest.raises(LockTimeoutError, match="held by here:live since .*momentry-db unlock --env dev "
                                                   "--store mongo"):
            mongo.apply(target, lock_timeout=0.3)
    assert clock.sleeps == [0.2, 0.2]  # looked again every 0.2 s until the 0.3 s were over
    db[mongo.LOCK_COLLECTION].delete_many({})
    clock.sleeps.clear()
    plant_lock(db, owner="otherhost:1:x", host="another-host.invalid", pid=dead_pid(), now=clock.now())
    with pytest.raises(LockTimeoutError, match="held by otherhost:1:x"):
        mongo.apply(target, lock_timeout=0.3)
    assert clock.sleeps == [0.2, 0.2]
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
        wait_until(lambda: proc.poll() is not None or db.ran.find_one({"name": "0002_slow"}), "0002_slow to start")
        assert proc.poll() is None, "the first run ended before 0002_slow"
        assert lock_doc(db)["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert applied(db) == {"0001_a"}
    hold.unlink()

    # The killed run's lock is taken over at once, not after its 30 s lease: with a lock timeout of 0
    # a lock that is still held fails the rerun.
    rerun = mongo_project.momentry_db("--project-dir", str(mongo_project.root), "migrate", "--env", "dev",
                                      "--store", "mongo", "--lock-timeout", "0")
    assert rerun.code == 0, rerun.err
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


def test_a_crashed_run_on_another_host_is_taken_over_when_its_lease_runs_out(target, db, clock: FakeClock) -> None:
    plant_lock(db, owner="otherhost:1:x", host="another-host.invalid", pid=1, minutes=1.5 / 60, now=clock.now())
    assert len(mongo.apply(target, lock_timeout=10)) == 2
    assert 1.5 < clock.monotonic() <= 1.5 + 0.2  # taken at the first look after the lease ran out
    assert set(clock.sleeps) == {0.2}
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


def test_a_holder_is_described_in_one_line() -> None:
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert mongo.describe_holder({"owner": "h:1:x", "acquired_at": t, "expires_at": t + dt.timedelta(seconds=30)}) == (
        "h:1:x since 2026-01-02T03:04:05+00:00 (lease until 2026-01-02T03:04:35+00:00)")
    assert mongo.describe_holder({}) == "? since ? (lease until ?)"


def test_which_pids_count_as_gone() -> None:
    assert [mongo._pid_gone(p) for p in ("12", None, 0, -1, 1.5, os.getpid())] == [False] * 6
    assert mongo._pid_gone(dead_pid()) is True  # reaped
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                   "the child to exit")
        assert mongo._pid_gone(zombie.pid) is True  # exited, not yet reaped
    finally:
        zombie.wait()
    with live_process() as alive:
        assert mongo._pid_gone(alive.pid) is False
