"""The embedded MongoDB server (SecantusDB) used when MONGODB_URL is not set, and `embedded status/stop`.

Every test here stops the servers it started; the autouse safety net in conftest stops any left over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.helpers import NO_GRANTS, Project, clean_environ, live_process, stop_embedded_servers
from pymongo import MongoClient

REAL_BINARY = Path(sys.executable).parent / "secantusd-py"


def _record(state: Path) -> dict[str, int]:
    return json.loads((state / "mongo" / "server.json").read_text())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _notice(state: Path, port: int) -> str:
    return f"mongo: MONGODB_URL is not set; using the embedded server in {state / 'mongo'} (127.0.0.1:{port})"


@pytest.fixture
def state(traversable_tmp: Path) -> Iterator[Path]:
    """This test's state dir (the embedded PostgreSQL may start there); its servers are stopped afterwards."""
    path = traversable_tmp / "state"
    yield path
    stop_embedded_servers(path)


@pytest.fixture
def embedded(tmp_path: Path, state: Path, database) -> Project:
    """A project with no MONGODB_URL and MOMENTRY_EMBEDDED unset; PostgreSQL is this test's database."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, {"DATABASE_URL": database.url, "MOMENTRY_STATE_DIR": str(state), **NO_GRANTS})


def _shape(port: int, name: str) -> dict[str, object]:
    client = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=5000)
    try:
        db = client[name]
        return {
            "chunks": sorted((i["name"], tuple(i["key"].items()), i.get("unique", False))
                             for i in db.chunks.list_indexes()),
            "cache": sorted((i["name"], tuple(i["key"].items()), i.get("unique", False), i.get("expireAfterSeconds"))
                            for i in db.cache.list_indexes()),
            "validator": {c["name"]: (sorted(c["options"].get("validator", {}).get("$jsonSchema", {})
                                             .get("required", [])), c["options"].get("validationLevel"))
                          for c in db.list_collections() if c["name"] == "chunks"},
        }
    finally:
        client.close()


EXPECTED_SHAPE = {
    "chunks": [("_id_", (("_id", 1),), False), ("created_at", (("created_at", 1),), False),
               ("video_id_sequence", (("video_id", 1), ("sequence", 1)), True)],
    "cache": [("_id_", (("_id", 1),), False, None), ("expires_at_ttl", (("expires_at", 1),), False, 0),
              ("key", (("key", 1),), True, None)],
    "validator": {"chunks": (["end_seconds", "sequence", "start_seconds", "video_id"], "moderate")},
}


def test_the_first_command_migrates_mongo_on_a_server_it_starts_and_the_next_reuses_it(tmp_path: Path,
                                                                                       state: Path) -> None:
    """The README's first command with no URL at all: PostgreSQL, MongoDB and Qdrant all migrate."""
    root = tmp_path / "fresh"
    root.mkdir()
    env = {**clean_environ(), "MOMENTRY_STATE_DIR": str(state)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "momentry_db.cli", "--project-dir", str(root), *args],
                              env=env, capture_output=True, text=True, timeout=120, check=False)

    first = run("migrate", "--env", "dev")
    assert first.returncode == 0, first.stderr
    server = _record(state)
    assert _notice(state, server["port"]) in first.stderr.splitlines()
    assert "mongo: skipped" not in first.stderr
    assert "mongo dev (database momentry_dev): applied 0001_chunks" in first.stdout
    assert "mongo dev (database momentry_dev): applied 0002_cache" in first.stdout
    assert first.stdout.splitlines()[-4:] == [
        "postgres dev (schema dev): upgraded (0001)",
        "mongo dev (database momentry_dev): upgraded (0001_chunks, 0002_cache)",
        "qdrant dev (collection momentry_dev_rule1): upgraded (create)",
        "done: 1 environment(s), 3 target(s): 3 upgraded, 0 up to date, 0 failed"]
    assert _shape(server["port"], "momentry_dev") == EXPECTED_SHAPE
    assert (state / "mongo" / "data").is_dir()

    second = run("migrate", "--env", "dev")
    assert second.returncode == 0, second.stderr
    assert "done: 1 environment(s), 3 target(s): 0 upgraded, 3 up to date, 0 failed" in second.stdout
    assert _record(state) == server  # the same server, reused
    assert _notice(state, server["port"]) in second.stderr.splitlines()
    assert "stale" not in second.stderr
    assert (state / "mongo" / "server.log").read_text().count("--- starting secantusd-py") == 1

    status = run("embedded", "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["server"]: row for row in json.loads(status.stdout)["servers"]}
    assert rows["mongo"] == {"server": "mongo", "state": "running", "address": f"127.0.0.1:{server['port']}",
                             "pid": server["pid"], "data_dir": str(state / "mongo" / "data"),
                             "log": str(state / "mongo" / "server.log"), "detail": ""}
    assert rows["postgres"]["state"] == "running"
    assert rows["postgres"]["data_dir"] == str(state / "pg")

    stop = run("embedded", "stop")
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.splitlines()[:2] == ["postgres: embedded server stopped", "mongo: embedded server stopped"]
    assert not _alive(server["pid"])
    assert not (state / "mongo" / "server.json").exists()
    again = run("embedded", "status")
    assert [line.split()[:2] for line in again.stdout.splitlines()[:2]] == [["postgres", "stopped"],
                                                                           ["mongo", "stopped"]]
    assert run("embedded", "stop").stdout.splitlines()[:2] == ["postgres: embedded server is not running",
                                                               "mongo: embedded server is not running"]


def test_a_killed_server_is_reported_stale_and_replaced_by_the_next_command(embedded: Project, state: Path) -> None:
    assert embedded.cli("migrate", "--env", "dev", "--store", "mongo").code == 0
    old = _record(state)
    os.kill(old["pid"], signal.SIGKILL)
    psutil.Process(old["pid"]).wait(10)  # reaped: the server was started by this process

    status = embedded.cli("embedded", "status", "--json")
    row = next(r for r in json.loads(status.out)["servers"] if r["server"] == "mongo")
    assert (row["state"], row["pid"], row["detail"]) == ("stale", old["pid"], f"pid {old['pid']} is not running")

    result = embedded.cli("status", "--env", "dev", "--store", "mongo")
    assert result.code == 0, result.err
    new = _record(state)
    assert new["pid"] != old["pid"] and _alive(new["pid"])
    assert result.err.splitlines()[:2] == [
        (f"mongo: the embedded server in {state / 'mongo'} was stale (pid {old['pid']} is not running); "
         "started a new one"),
        _notice(state, new["port"])]
    # WiredTiger kept the data across the kill: the new server sees dev migrated.
    assert "mongo dev (database momentry_dev): current 0002_cache, head 0002_cache; up to date" in result.out


def test_a_server_that_no_longer_answers_is_stopped_and_replaced(embedded: Project, state: Path) -> None:
    assert embedded.cli("migrate", "--env", "dev", "--store", "mongo").code == 0
    old = _record(state)
    os.kill(old["pid"], signal.SIGSTOP)  # alive, holding its port, answering nothing
    result = embedded.cli("status", "--env", "dev", "--store", "mongo")
    assert result.code == 0, result.err
    assert result.err.splitlines()[0] == (
        f"mongo: the embedded server in {state / 'mongo'} was stale (pid {old['pid']} does not answer on port "
        f"{old['port']}); started a new one")
    assert not _alive(old["pid"])
    new = _record(state)
    assert new["pid"] != old["pid"] and _alive(new["pid"])
    assert "mongo dev (database momentry_dev): current 0002_cache, head 0002_cache; up to date" in result.out


def test_a_record_whose_port_another_process_now_holds_is_replaced_on_another_port(
        embedded: Project, state: Path, silent_server) -> None:
    port, _ = silent_server
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (state / "mongo").mkdir(parents=True)
    (state / "mongo" / "server.json").write_text(json.dumps({"pid": gone.pid, "port": port}))

    result = embedded.cli("migrate", "--env", "dev", "--store", "mongo")
    assert result.code == 0, result.err
    new = _record(state)
    assert new["port"] != port
    assert result.err.splitlines()[0] == (
        f"mongo: the embedded server in {state / 'mongo'} was stale (pid {gone.pid} is not running; "
        f"port {port} now belongs to another process); started a new one")
    assert "mongo dev (database momentry_dev): applied 0002_cache" in result.out


def test_a_recorded_pid_that_is_now_another_program_is_never_signalled(embedded: Project, state: Path,
                                                                       silent_server) -> None:
    port, _ = silent_server
    with live_process() as bystander:
        (state / "mongo").mkdir(parents=True)
        (state / "mongo" / "server.json").write_text(json.dumps({"pid": bystander.pid, "port": port}))
        result = embedded.cli("migrate", "--env", "dev", "--store", "mongo")
        assert result.code == 0, result.err
        assert result.err.splitlines()[0] == (
            f"mongo: the embedded server in {state / 'mongo'} was stale (pid {bystander.pid} is no longer the "
            f"embedded server; port {port} now belongs to another process); started a new one")
        assert bystander.poll() is None  # still running


def test_two_concurrent_first_runs_start_one_server(embedded: Project, state: Path) -> None:
    argv = [sys.executable, "-m", "momentry_db.cli", "migrate", "--env", "dev", "--store", "mongo"]
    procs = [subprocess.Popen(argv, cwd=embedded.root, env=embedded.run_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    server = _record(state)
    assert (state / "mongo" / "server.log").read_text().count("--- starting secantusd-py") == 1
    for _, err in outputs:
        assert _notice(state, server["port"]) in err.splitlines()
    out = "".join(o for o, _ in outputs)
    assert out.count("applied 0001_chunks") == 1 and out.count("applied 0002_cache") == 1


def test_every_mongo_command_uses_the_embedded_server(embedded: Project, state: Path) -> None:
    for env in ("prod", "dev"):
        assert embedded.cli("migrate", "--env", env, "--store", "mongo").code == 0
    server = _record(state)
    client = MongoClient(f"mongodb://127.0.0.1:{server['port']}/?directConnection=true")
    try:
        client.momentry.chunks.insert_one({"video_id": 1, "sequence": 0, "start_seconds": 0, "end_seconds": 1})
        verify = embedded.cli("verify", "--env", "dev", "--store", "mongo")
        assert verify.code == 0, verify.out + verify.err
        assert "database momentry_dev matches its migrations" in verify.out
        history = embedded.cli("history", "--env", "dev", "--store", "mongo", "--json")
        assert sorted(e["step"] for e in json.loads(history.out)["history"]) == ["0001_chunks", "0002_cache"]
        plan = embedded.cli("plan", "--env", "dev", "--store", "mongo")
        assert plan.code == 0 and _notice(state, server["port"]) in plan.err.splitlines()
        clone = embedded.cli("clone", "--from", "prod", "--to", "dev", "--store", "mongo")
        assert clone.code == 0, clone.err
        assert "mongo prod -> dev: chunks: 1 copied" in clone.out
        assert client.momentry_dev.chunks.count_documents({}) == 1
        unlock = embedded.cli("unlock", "--env", "dev", "--store", "mongo")
        assert unlock.out.strip() == "mongo dev: no migration lock held"
        reset = embedded.cli("reset", "--env", "dev", "--yes")
        assert reset.code == 0, reset.err
        assert "mongo dev: dropped momentry_dev" in reset.out.splitlines()
        assert client.momentry_dev.chunks.count_documents({}) == 0  # dropped, then migrated again
        assert client.momentry.chunks.count_documents({}) == 1  # prod untouched
        client.drop_database("momentry_dev")
        all_envs = embedded.cli("migrate", "--all", "--store", "mongo")
        assert all_envs.code == 0, all_envs.err
        assert all_envs.err.splitlines().count(_notice(state, server["port"])) == 1
        assert _shape(server["port"], "momentry_dev") == EXPECTED_SHAPE
    finally:
        client.close()
    assert _record(state) == server  # one server throughout


def test_embedded_off_keeps_the_mongo_skip_and_starts_nothing(project: Project, tmp_path: Path) -> None:
    result = project.cli("migrate", "--env", "dev")  # the project fixture sets MOMENTRY_EMBEDDED=off
    assert result.code == 0, result.err
    assert "mongo: skipped (MONGODB_URL is not set)" in result.err.splitlines()
    assert not (tmp_path / "state" / "mongo").exists()
    status = project.cli("embedded", "status")
    assert status.out.splitlines()[-1] == "MOMENTRY_EMBEDDED=off: commands do not start these servers"


def test_embedded_off_without_database_url_is_a_config_error(bare_project: Project, tmp_path: Path) -> None:
    result = bare_project.cli("migrate", "--env", "dev")
    assert result.code == 2
    assert result.err.strip() == (
        "error: DATABASE_URL is not set and MOMENTRY_EMBEDDED=off turns the embedded PostgreSQL off; "
        "set DATABASE_URL, or unset MOMENTRY_EMBEDDED to use the embedded server")
    assert not (tmp_path / "state" / "pg").exists()


@pytest.mark.parametrize("value", ["maybe", "0", "yes"])
def test_a_bad_embedded_value_is_refused_before_anything_starts(bare_project: Project, tmp_path: Path,
                                                                value: str) -> None:
    result = bare_project.cli("migrate", "--env", "dev", env={"MOMENTRY_EMBEDDED": value})
    assert result.code == 2
    assert result.err.strip() == (f"error: MOMENTRY_EMBEDDED must be on or off, not {value!r}; off disables "
                                  "the embedded PostgreSQL and MongoDB servers")
    assert not (tmp_path / "state").exists()


def _fake_binary(tmp_path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a secantusd-py of this test's own beside a stand-in sys.executable."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "secantusd-py"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))


def test_a_missing_server_binary_says_how_to_install_it(embedded: Project, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    result = embedded.cli("migrate", "--env", "dev", "--store", "mongo")
    assert result.code == 2
    assert result.err.strip() == (
        "error: the embedded MongoDB server needs secantusd-py, which is not installed: run pip install "
        "SecantusDB in this Python environment, or set MONGODB_URL to a MongoDB server "
        "(MOMENTRY_EMBEDDED=off skips MongoDB instead)")


@pytest.mark.parametrize("argv", [("migrate", "--env", "dev"), ("migrate", "--all")])
def test_a_server_that_exits_while_starting_names_its_log_and_nothing_is_written(
        embedded: Project, state: Path, tmp_path: Path, database, monkeypatch: pytest.MonkeyPatch,
        argv: tuple[str, ...]) -> None:
    _fake_binary(tmp_path, "echo 'storage is corrupt' >&2\nexit 3\n", monkeypatch)
    result = embedded.cli(*argv)
    assert result.code == 2
    log = state / "mongo" / "server.log"
    assert result.err.strip().splitlines()[-1] == (
        f"error: mongo: the embedded server exited while starting (exit code 3); see its log {log}, or set "
        "MONGODB_URL to another server")
    assert "storage is corrupt" in log.read_text()
    assert not (state / "mongo" / "server.json").exists()
    assert (database.tables("public"), database.tables("dev")) == (set(), set())  # PostgreSQL untouched


def test_a_port_taken_at_bind_time_is_retried_on_another(embedded: Project, state: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "failed-once"
    _fake_binary(tmp_path, f"if [ ! -e {mark} ]; then touch {mark}; "
                           "echo 'OSError: [Errno 98] Address already in use' >&2; exit 1; fi\n"
                           f"exec {REAL_BINARY} \"$@\"\n", monkeypatch)
    result = embedded.cli("migrate", "--env", "dev", "--store", "mongo")
    assert result.code == 0, result.err
    log = (state / "mongo" / "server.log").read_text()
    assert log.count("--- starting secantusd-py") == 2
    assert log.count("Address already in use") == 1
    assert _alive(_record(state)["pid"])
    assert "mongo dev (database momentry_dev): applied 0002_cache" in result.out


def test_two_concurrent_first_runs_start_one_embedded_postgresql(traversable_tmp: Path) -> None:
    """Two commands that both find no embedded PostgreSQL yet: one creates and starts it, the other
    waits for it and reuses it (neither fails on the half-made data directory)."""
    state = traversable_tmp / "state"
    code = "import sys; from pathlib import Path; from momentry_db.stores.embedded import embedded_url; " \
           "print(embedded_url(Path(sys.argv[1])))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_environ()) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    urls = [out.strip() for out, _ in outputs]
    assert urls[0] == urls[1] and urls[0].startswith("postgresql+psycopg://") and "/momentry?" in urls[0], urls
    assert len(list((state / "pg").glob("postmaster.pid"))) == 1
