"""MongoDB runner on a real server (SecantusDB over the wire protocol).

Each test has databases of its own: on the session's server a unique dev database
(``mongo_db_name``), or a server of its own (``fresh_mongo_url``) when it needs the
default names of several environments. The lock's lease, ownership and takeover are
in test_mongo_lock.py.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError, WriteError

from momentry_db import command
from momentry_db.errors import ConfigError, StoreError
from momentry_db.settings import load_project
from momentry_db.stores import mongo
from tests.helpers import REPO, count_mongo_clients, wait_until

pytestmark = pytest.mark.mongo

STEPS = ["0001_chunks", "0002_cache"]
BOOKKEEPING = set(mongo.BOOKKEEPING)  # state, history, lock and recorded shapes


@pytest.fixture
def client(mongo_url: str):
    c = MongoClient(mongo_url, tz_aware=True)
    yield c
    c.close()


@pytest.fixture
def db(client, mongo_db_name: str):
    return client[mongo_db_name]


@pytest.fixture
def proj(tmp_path: Path, mongo_url: str, mongo_db_name: str):
    """A project whose dev environment is this test's own database on the session's server."""
    return load_project(tmp_path, {"MONGODB_URL": mongo_url, "MONGODB_DATABASE": mongo_db_name,
                                   "MOMENTRY_STATE_DIR": str(tmp_path / "state")})


@pytest.fixture
def target(proj):
    t = mongo.MongoTarget(proj.environment("dev"))
    yield t
    t.close()


@pytest.fixture
def server(fresh_mongo_url: str):
    """A client on a server of this test's own, where every environment has its default database."""
    c = MongoClient(fresh_mongo_url, tz_aware=True)
    yield c
    c.close()


@pytest.fixture
def envs_project(bare_project, fresh_mongo_url: str, server):
    """A project whose environments' MongoDB databases keep their default names, on this test's own server."""
    bare_project.environ["MONGODB_URL"] = fresh_mongo_url
    return bare_project


def write_migrations(directory: Path, bodies: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (directory / f"{name}.py").write_text(body)
    return directory


COUNTING = '''"""{doc}"""
import time
dependencies = {deps!r}

def upgrade(db):
    db.ran.insert_one({{"name": "{name}"}})
    {extra}

def downgrade(db):
    pass
'''


def counting(name: str, deps: list[str], extra: str = "") -> str:
    return COUNTING.format(doc=f"step {name}", deps=deps, name=name, extra=extra or "pass")


def applied(db) -> set[str]:
    return {d["name"] for d in db[mongo.STATE_COLLECTION].find({"applied": {"$ne": None}})}


def ran(db) -> list[str]:
    return sorted(d["name"] for d in db.ran.find())


def outcomes(db) -> list[tuple[str, str]]:
    return sorted((d["step"], d["outcome"]) for d in db[mongo.HISTORY_COLLECTION].find())


def databases(server) -> list[str]:
    """The server's databases, without the ones the server keeps for itself."""
    return sorted(set(server.list_database_names()) - {"admin", "config", "local"})


def documents(db) -> dict[str, list[dict]]:
    """Every data collection's documents, in _id order."""
    return {name: list(db[name].find({}, sort=[("_id", 1)]))
            for name in sorted(db.list_collection_names()) if name not in BOOKKEEPING}


def migrate(project, env: str = "dev", *args: str):
    return project.cli("migrate", "--env", env, "--store", "mongo", *args)


CHUNK = {"video_id": 1, "sequence": 0, "start_seconds": 0.0, "end_seconds": 1.0}


# --- the project's migrations ------------------------------------------------------------------


def test_the_project_migrations_load_in_order() -> None:
    assert [m.name for m in mongo.load_migrations()] == STEPS


def test_chunks_get_their_indexes_and_a_validator_that_rejects_a_bad_document(target, db) -> None:
    assert [s.name for s in mongo.apply(target)] == STEPS
    indexes = {name: (info["key"], info.get("unique", False)) for name, info in db.chunks.index_information().items()}
    assert indexes == {"_id_": ([("_id", 1)], False),
                       "video_id_sequence": ([("video_id", 1), ("sequence", 1)], True),
                       "created_at": ([("created_at", 1)], False)}
    (info,) = db.list_collections(filter={"name": "chunks"})
    assert info["options"]["validator"] == mongo.load_migrations()[0].module.VALIDATOR
    assert info["options"]["validationLevel"] == "moderate"

    db.chunks.insert_one(dict(CHUNK))
    with pytest.raises(WriteError, match=r"(?i)document failed validation") as rejected:
        db.chunks.insert_one({"video_id": "not a number", "sequence": 1})
    assert rejected.value.code == 121
    with pytest.raises(WriteError, match=r"(?i)document failed validation") as negative:
        db.chunks.insert_one({**CHUNK, "sequence": -1})
    assert negative.value.code == 121
    assert [{k: v for k, v in d.items() if k != "_id"} for d in db.chunks.find()] == [CHUNK]


def test_cache_gets_a_unique_key_and_a_ttl_index_on_its_expiry(target, db) -> None:
    mongo.apply(target)
    info = db.cache.index_information()
    assert sorted(info) == ["_id_", "expires_at_ttl", "key"]
    assert (info["key"]["key"], info["key"]["unique"]) == ([("key", 1)], True)
    assert info["expires_at_ttl"]["key"] == [("expires_at", 1)]
    assert info["expires_at_ttl"]["expireAfterSeconds"] == 0
    assert "unique" not in info["expires_at_ttl"]
    db.cache.insert_one({"key": "a"})
    with pytest.raises(DuplicateKeyError, match=r"(?i)duplicate key") as duplicate:
        db.cache.insert_one({"key": "a"})
    assert duplicate.value.code == 11000
    assert db.cache.count_documents({}) == 1


def test_each_environment_gets_its_own_database(tmp_path: Path, fresh_mongo_url: str, server) -> None:
    proj = load_project(tmp_path, {"MONGODB_URL": fresh_mongo_url})
    dev = mongo.MongoTarget(proj.environment("dev"))
    assert [s.name for s in mongo.apply(dev)] == STEPS
    assert databases(server) == ["momentry_dev"]
    prod = mongo.MongoTarget(proj.environment("prod"))
    assert [s.name for s in mongo.apply(prod)] == STEPS
    assert databases(server) == ["momentry", "momentry_dev"]
    for name in ("momentry", "momentry_dev"):
        assert applied(server[name]) == set(STEPS)
        assert sorted(server[name].list_collection_names()) == sorted({"cache", "chunks", *BOOKKEEPING})
    dev.close()
    prod.close()


def test_state_is_readable_by_pymongo_migrate(target, client, mongo_db_name: str) -> None:
    from pymongo_migrate.mongo_migrate import MongoMigrate

    mongo.apply(target)
    mm = MongoMigrate(client, mongo_db_name, migrations_dir=str(REPO / "mongo_migrations"))
    assert [(m.name, mm.get_state(m).applied is not None) for m in mm.get_migrations()] == [
        ("0001_chunks", True), ("0002_cache", True)]


def test_second_apply_does_nothing(target, db) -> None:
    mongo.apply(target)
    before = list(db[mongo.STATE_COLLECTION].find())
    assert mongo.apply(target) == []
    assert mongo.plan(target).pending == ()
    assert list(db[mongo.STATE_COLLECTION].find()) == before
    assert outcomes(db) == [("0001_chunks", "applied"), ("0002_cache", "applied")]


def test_dry_run_writes_nothing(proj, client, mongo_db_name: str) -> None:
    before = sorted(client.list_database_names())
    result = command.migrate(proj, "dev", stores=["mongo"], dry_run=True)
    (plan,) = result.targets
    assert [s.name for s in plan.pending] == STEPS
    assert result.applied == []
    assert sorted(client.list_database_names()) == before
    assert mongo_db_name not in before


def test_command_runs_mongo_with_a_progress_event_per_step(proj) -> None:
    events = []
    result = command.migrate(proj, "dev", stores=["mongo"],
                             emit=lambda e, p: events.append((e, getattr(p, "name", p))))
    assert [s.name for s in result.applied] == STEPS
    assert [e for e in events if e[0] == "upgraded"] == [("upgraded", "0001_chunks"), ("upgraded", "0002_cache")]


# --- runs through the CLI ----------------------------------------------------------------------


def test_migrate_through_the_cli_then_a_rerun_is_a_no_op(mongo_project, client) -> None:
    name = mongo_project.environ["MONGODB_DATABASE"]
    first = migrate(mongo_project)
    assert first.code == 0, first.err
    assert first.out.splitlines() == [
        f"mongo dev (database {name}): applied 0001_chunks chunks: lookup indexes and a $jsonSchema validator.",
        f"mongo dev (database {name}): applied 0002_cache cache: a unique key and a TTL index on the expiry field.",
        f"mongo dev (database {name}): upgraded (0001_chunks, 0002_cache)",
        "done: 1 environment(s), 1 target(s): 1 upgraded, 0 up to date, 0 failed"]
    before = list(client[name][mongo.STATE_COLLECTION].find())
    again = migrate(mongo_project)
    assert again.code == 0, again.err
    assert again.out.splitlines() == [f"mongo dev (database {name}): up to date (at 0002_cache)",
                                      "done: 1 environment(s), 1 target(s): 0 upgraded, 1 up to date, 0 failed"]
    assert list(client[name][mongo.STATE_COLLECTION].find()) == before


def connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP connection open to ``port`` on this host."""
    import psutil

    try:
        return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.Error:
        return False


def test_two_processes_racing_apply_each_migration_once(mongo_project, client, tmp_path: Path) -> None:
    """Two `migrate` processes started together: one applies, the other waits for the lock, then finds
    nothing to do."""
    hold = tmp_path / "hold"
    hold.touch()
    # 0001_a holds its run inside the lock until the test removes the file (60 s only bounds a failure).
    wait = (f"hold = __import__('pathlib').Path({str(hold)!r})\n"
            "    deadline = time.monotonic() + 60\n"
            "    while hold.exists() and time.monotonic() < deadline:\n"
            "        time.sleep(0.02)")
    write_migrations(mongo_project.root / "mongo_migrations", {
        "0001_a": counting("0001_a", [], extra=wait),
        "0002_b": counting("0002_b", ["0001_a"]),
        "0003_c": counting("0003_c", ["0002_b"]),
    })
    argv = [sys.executable, "-m", "momentry_db.cli", "--project-dir", str(mongo_project.root),
            "migrate", "--env", "dev", "--store", "mongo", "--json"]
    db = client[mongo_project.environ["MONGODB_DATABASE"]]
    procs = [subprocess.Popen(argv, cwd=mongo_project.root, env=mongo_project.run_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        # One run is inside 0001_a, holding the lock; the other is let go on once it has connected to the
        # server, on its way to that lock.
        holder = wait_until(lambda: any(p.poll() is not None for p in procs) or db[mongo.LOCK_COLLECTION].find_one(
            {"_id": mongo.LOCK_ID, "pid": {"$in": [p.pid for p in procs]}}), "a run to take the lock")
        assert isinstance(holder, dict), "a run ended before either held the lock"
        (other,) = [p for p in procs if p.pid != holder["pid"]]
        port = int(mongo_project.environ["MONGODB_URL"].split(":")[2].split("/")[0])
        wait_until(lambda: other.poll() is not None or connected_to(other.pid, port), "the other run to connect")
    finally:
        hold.unlink()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    steps = sorted(([s["name"] for s in json.loads(out)["applied"]] for _, out, _ in results), key=len)
    assert steps == [[], ["0001_a", "0002_b", "0003_c"]]
    assert ran(db) == ["0001_a", "0002_b", "0003_c"]
    assert applied(db) == {"0001_a", "0002_b", "0003_c"}
    assert db[mongo.STATE_COLLECTION].count_documents({}) == 3
    assert outcomes(db) == [("0001_a", "applied"), ("0002_b", "applied"), ("0003_c", "applied")]
    assert db[mongo.LOCK_COLLECTION].count_documents({}) == 0


def test_a_failure_is_recorded_shown_in_history_and_a_rerun_resumes(mongo_project, client) -> None:
    name = mongo_project.environ["MONGODB_DATABASE"]
    folder = write_migrations(mongo_project.root / "mongo_migrations", {
        "0001_a": counting("0001_a", []),
        "0002_b": counting("0002_b", ["0001_a"], extra="raise RuntimeError('disk full')"),
        "0003_c": counting("0003_c", ["0002_b"]),
    })
    failed = migrate(mongo_project)
    assert failed.code == 1
    assert [x for x in failed.err.splitlines() if x.startswith("error:")] == [
        f"error: mongo dev (database {name}): migration 0002_b failed: RuntimeError: disk full"]
    db = client[name]
    assert applied(db) == {"0001_a"}
    assert outcomes(db) == [("0001_a", "applied"), ("0002_b", "failed")]
    assert db[mongo.LOCK_COLLECTION].count_documents({}) == 0

    write_migrations(folder, {"0002_b": counting("0002_b", ["0001_a"])})
    resumed = migrate(mongo_project, "dev", "--json")
    assert resumed.code == 0, resumed.err
    assert [s["name"] for s in json.loads(resumed.out)["applied"]] == ["0002_b", "0003_c"]
    assert applied(db) == {"0001_a", "0002_b", "0003_c"}
    assert ran(db) == ["0001_a", "0002_b", "0002_b", "0003_c"]  # the failed attempt ran once, then the fixed one

    history = mongo_project.cli("history", "--env", "dev", "--store", "mongo", "--json")
    assert history.code == 0, history.err
    rows = [(r["env"], r["store"], r["step"], r["outcome"], r["error"]) for r in json.loads(history.out)["history"]]
    assert rows == [("dev", "mongo", "0003_c", "applied", None), ("dev", "mongo", "0002_b", "applied", None),
                    ("dev", "mongo", "0002_b", "failed", "RuntimeError: disk full"),
                    ("dev", "mongo", "0001_a", "applied", None)]
    text = mongo_project.cli("history", "--env", "dev", "--store", "mongo", "--limit", "2")
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert len(lines) == 2
    assert [line.split()[1:4] for line in lines] == [["mongo", "0003_c", "applied"], ["mongo", "0002_b", "applied"]]


def test_verify_checks_the_mongo_database_against_its_migrations(mongo_project) -> None:
    name = mongo_project.environ["MONGODB_DATABASE"]
    missing = mongo_project.cli("verify", "--env", "dev", "--store", "mongo", "--json")
    assert missing.code == 1
    assert [(c["name"], c["status"], c["detail"]) for c in json.loads(missing.out)["checks"]] == [
        ("database differs from other environments'", "pass", name),
        (f"database {name} exists", "fail", f"database {name} does not exist; run migrate"),
        (f"login is limited to {name}", "not checkable here",
         "MONGODB_URL names no user; name a user of dev's own in it, then run momentry-db grant --env dev --store mongo")]

    assert migrate(mongo_project).code == 0
    passing = mongo_project.cli("verify", "--env", "dev", "--store", "mongo")
    assert passing.code == 0, passing.out
    assert f"ok   mongo    database {name} exists" in passing.out.splitlines()
    assert f"ok   mongo    database {name} matches its migrations: at 0002_cache" in passing.out.splitlines()

    folder = mongo_project.root / "mongo_migrations"
    shutil.copytree(REPO / "mongo_migrations", folder)
    write_migrations(folder, {"0003_more": counting("0003_more", ["0002_cache"])})
    behind = mongo_project.cli("verify", "--env", "dev", "--store", "mongo")
    assert behind.code == 1
    assert f"FAIL mongo    database {name} matches its migrations: pending: 0003_more" in behind.out.splitlines()


def test_migrate_all_gives_every_environment_its_migrations(envs_project, server) -> None:
    envs_project.environ["MOMENTRY_EXTRA_ENVS"] = "pr-1,pr-2"
    names = ["momentry", "momentry_dev", "momentry_pr_1", "momentry_pr_2"]
    assert migrate(envs_project, "prod").code == 0
    result = envs_project.cli("migrate", "--all", "--store", "mongo", "--json")
    assert result.code == 0, result.err
    assert [(t["env"], t["target"], t["outcome"], t["applied"]) for t in json.loads(result.out)["targets"]] == [
        ("prod", "momentry", "up to date", []), ("dev", "momentry_dev", "upgraded", STEPS),
        ("pr-1", "momentry_pr_1", "upgraded", STEPS), ("pr-2", "momentry_pr_2", "upgraded", STEPS)]
    assert databases(server) == names
    for name in names:
        assert applied(server[name]) == set(STEPS)
        assert outcomes(server[name]) == [("0001_chunks", "applied"), ("0002_cache", "applied")]
        assert server[name].cache.index_information()["key"]["unique"] is True

    folder = envs_project.root / "mongo_migrations"
    shutil.copytree(REPO / "mongo_migrations", folder)
    write_migrations(folder, {"0003_more": counting("0003_more", ["0002_cache"])})
    more = envs_project.cli("migrate", "--all", "--store", "mongo")
    assert more.code == 0, more.err
    assert [line for line in more.out.splitlines() if ": applied 0003_more" not in line] == [
        "mongo prod (database momentry): upgraded (0003_more)", "mongo dev (database momentry_dev): upgraded (0003_more)",
        "mongo pr-1 (database momentry_pr_1): upgraded (0003_more)",
        "mongo pr-2 (database momentry_pr_2): upgraded (0003_more)",
        "done: 4 environment(s), 4 target(s): 4 upgraded, 0 up to date, 0 failed"]
    for name in names:
        assert applied(server[name]) == {*STEPS, "0003_more"}
        assert ran(server[name]) == ["0003_more"]


def test_reset_drops_dev_and_leaves_prods_documents_untouched(project, database, fresh_mongo_url, server) -> None:
    project.environ["MONGODB_URL"] = fresh_mongo_url
    for env in ("prod", "dev"):
        assert project.cli("migrate", "--env", env).code == 0
    for name, n in (("momentry", 6), ("momentry_dev", 4)):
        server[name].cache.insert_many([{"key": f"k{i}"} for i in range(n)])
        server[name].chunks.insert_many([{**CHUNK, "sequence": i} for i in range(n)])
    prod_before = documents(server["momentry"])
    prod_state = list(server["momentry"][mongo.STATE_COLLECTION].find())

    result = project.cli("reset", "--env", "dev", "--yes")
    assert result.code == 0, result.err
    assert "mongo dev: dropped momentry_dev" in result.out.splitlines()
    assert documents(server["momentry"]) == prod_before
    assert list(server["momentry"][mongo.STATE_COLLECTION].find()) == prod_state
    assert {k: len(v) for k, v in documents(server["momentry_dev"]).items()} == {"cache": 0, "chunks": 0}
    assert applied(server["momentry_dev"]) == set(STEPS)  # migrated again
    assert server["momentry_dev"].cache.index_information()["key"]["unique"] is True


def test_clone_copies_every_document_across_several_batches_and_honours_limit(envs_project, server) -> None:
    for env in ("prod", "dev"):
        assert migrate(envs_project, env).code == 0
    batch = inspect.signature(mongo.clone).parameters["batch"].default
    many = 2 * batch + 500
    prod = server["momentry"]
    prod.cache.insert_many([{"key": f"k{i:05}", "value": i} for i in range(many)])
    prod.chunks.insert_many([{**CHUNK, "sequence": i} for i in range(3)])
    server["momentry_dev"].cache.insert_many([{"key": f"old{i}"} for i in range(7)])
    prod_before = documents(prod)

    result = envs_project.cli("clone", "--from", "prod", "--to", "dev", "--store", "mongo", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["copied"] == {"mongo": {"cache": many, "chunks": 3}}
    assert documents(server["momentry_dev"]) == prod_before  # every document, old ones replaced
    assert documents(prod) == prod_before

    limited = envs_project.cli("clone", "--from", "prod", "--to", "dev", "--store", "mongo", "--limit", "5")
    assert limited.code == 0, limited.err
    assert limited.out.splitlines() == ["mongo prod -> dev: cache: 5 copied", "mongo prod -> dev: chunks: 3 copied"]
    assert documents(server["momentry_dev"]) == {"cache": prod_before["cache"][:5], "chunks": prod_before["chunks"]}
    assert documents(prod) == prod_before


# --- bad input and unreachable servers -----------------------------------------------------------


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


def test_a_bad_migration_module_stops_the_run_before_any_store_is_touched(project, database, mongo_url,
                                                                          mongo_db_name, client,
                                                                          tmp_path: Path) -> None:
    bad = write_migrations(tmp_path / "m", {"0001_a": counting("0001_a", ["0001_a"])})
    proj = load_project(project.root, {**project.environ, "MONGODB_URL": mongo_url,
                                       "MONGODB_DATABASE": mongo_db_name})
    with pytest.raises(ConfigError, match=r"m: dependency cycle: 0001_a -> 0001_a"):
        command.migrate(proj, "dev", sources=command.Sources(mongo_migrations=bad))
    assert database.tables("dev") == set()
    assert mongo_db_name not in client.list_database_names()


def test_a_failing_migration_raises_a_store_error_naming_it(target, db, tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "m", {
        "0001_a": counting("0001_a", [], extra="db.command({'noSuchCommand': 1})")})
    with pytest.raises(StoreError) as info:
        mongo.apply(target, mongo.load_migrations(folder))
    assert str(info.value).startswith(f"mongo dev (database {db.name}): migration 0001_a failed: OperationFailure: "
                                    "no such command: 'noSuchCommand'")
    assert applied(db) == set()
    assert outcomes(db) == [("0001_a", "failed")]


@pytest.mark.parametrize(("message", "reason"), [
    # the two ways pymongo reports a silent server, depending on which equal timeout fires first
    ("No servers found yet, Timeout: 5.0s, Topology Description: <...>", "no answer within 5s"),
    ("127.0.0.1:4242: timed out (configured timeouts: socketTimeoutMS: 5000.0ms, connectTimeoutMS: 5000.0ms), "
     "Timeout: 5.0s, Topology Description: <...>", "no answer within 5s"),
    ("127.0.0.1:4242: [Errno 111] Connection refused (configured timeouts: connectTimeoutMS: 5000.0ms), "
     "Timeout: 5.0s", "127.0.0.1:4242: [Errno 111] Connection refused"),
    ("auth failed for s3cret\nmore", "auth failed for ***"),
])
def test_an_unreachable_reason_is_one_line_and_the_same_for_either_timeout(message: str, reason: str) -> None:
    assert mongo.unreachable_reason(Exception(message), ["s3cret"]) == reason


def test_unreachable_mongo_fails_in_one_line_naming_the_store(project, silent_server) -> None:
    port, accepted = silent_server
    result = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev",
                                 "--store", "mongo",
                                 env={"MONGODB_URL": f"mongodb://app:m0ngo-pw@127.0.0.1:{port}/?directConnection=true"})
    assert result.code == 1
    lines = [x for x in result.err.splitlines() if x.startswith("error:")]
    assert lines == [f"error: mongo: cannot reach mongodb://app:***@127.0.0.1:{port}/?directConnection=true: "
                     "no answer within 5s"]
    assert "m0ngo-pw" not in result.out + result.err and "Traceback" not in result.err
    assert accepted


def test_a_mongo_server_is_asked_with_the_5_second_timeouts(tmp_path: Path, monkeypatch) -> None:
    import pymongo

    class Built(Exception):
        pass

    given: dict = {}

    def client(url, **kwargs):
        given.update(kwargs)
        raise Built

    monkeypatch.setattr(pymongo, "MongoClient", client)
    proj = load_project(tmp_path, {"MONGODB_URL": "mongodb://127.0.0.1:1", "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    with pytest.raises(Built):
        mongo.MongoTarget(proj.environment("dev")).connect()
    assert (given["serverSelectionTimeoutMS"], given["connectTimeoutMS"]) == (mongo.TIMEOUT_MS,) * 2 == (5000, 5000)


def test_a_silent_server_is_waited_on_once_for_all_its_environments(project, silent_server, monkeypatch) -> None:
    port, accepted = silent_server
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    clients = count_mongo_clients(monkeypatch)
    result = project.cli("migrate", "--all", "--store", "mongo", "--json",
                         env={"MONGODB_URL": url, "MOMENTRY_EXTRA_ENVS": "pr-1,pr-2"})
    assert result.code == 1
    body = json.loads(result.out)
    assert [(t["env"], t["outcome"], t["error"]) for t in body["targets"]] == [
        (env, "failed", f"mongo: cannot reach {url}: no answer within 5s") for env in ("prod", "dev", "pr-1", "pr-2")]
    assert clients == [url]  # one wait, not one per environment
    assert accepted


def test_a_command_that_used_mongodb_exits_without_waiting_on_pymongos_monitors(mongo_project) -> None:
    """pymongo joins its monitor threads at exit, and a monitor waiting on a streaming ``hello`` notices
    that its client was closed only at its next half-second poll. Every client a command opened is
    closed when it ends, so the command leaves the threads to end with the process: the exit join
    never runs, and the run's outcome is unchanged."""
    probe = mongo_project.root / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        "import pymongo.periodic_executor as executors\n"
        "join = executors.PeriodicExecutor.join\n"
        "def joined(self, timeout=None):\n"
        "    print('joined', self._name, file=sys.stderr)\n"
        "    return join(self, timeout)\n"
        "executors.PeriodicExecutor.join = joined\n"
        "sys.argv = ['momentry-db', *sys.argv[1:]]\n"
        "runpy.run_module('momentry_db.cli', run_name='__main__')\n")
    for outcome in ("upgraded", "up to date"):  # the first run applies the migrations, the second finds nothing
        result = mongo_project.run(sys.executable, str(probe), "migrate", "--env", "dev", "--store", "mongo", "--json")
        assert result.code == 0, result.err
        assert [line for line in result.err.splitlines() if line.startswith("joined")] == []
        assert [t["outcome"] for t in json.loads(result.out)["targets"]] == [outcome]
