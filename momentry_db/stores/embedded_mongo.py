"""The embedded MongoDB server (SecantusDB), used when no MONGODB_URL is configured.

SecantusDB speaks MongoDB's wire protocol on WiredTiger. It is licensed GPL-2.0, so it
only ever runs as a separate process (``secantusd-py``); nothing here imports it. The
server is detached from the command that starts it and keeps running, so later commands
reuse it; a small state file records its pid and port.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UnreachableError

BINARY = "secantusd-py"
HOST = "127.0.0.1"
START_TIMEOUT = 20.0  # seconds for a new server to answer
START_ATTEMPTS = 3  # a port taken between choosing it and binding it is retried on another
PROBE_TIMEOUT_MS = 3000  # generous: a busy server must not be taken for a hung one and replaced
STOP_TIMEOUT = 10.0
CACHE_SIZE = "256M"  # WiredTiger's cache; a development server needs little


def home(state_dir: Path) -> Path:
    """The server's directory: state file, log, start-up lock, and its data in ``data/``."""
    return state_dir / "mongo"


def url_for(port: int) -> str:
    return f"mongodb://{HOST}:{port}/?directConnection=true"


@dataclass(frozen=True)
class Server:
    """The embedded server a command uses."""

    home: Path
    pid: int
    port: int
    started: bool = False  # started by this command (else reused)
    replaced: str = ""  # why a recorded server could not be reused, when one was recorded

    @property
    def url(self) -> str:
        return url_for(self.port)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def binary() -> Path:
    """secantusd-py beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / BINARY
    if beside.exists():
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise ConfigError(f"the embedded MongoDB server needs {BINARY}, which is not installed: run "
                      "pip install SecantusDB in this Python environment, or set MONGODB_URL to a MongoDB "
                      "server (MOMENTRY_EMBEDDED=off skips MongoDB instead)")


def ensure(state_dir: Path) -> Server:
    """Reuse the running embedded server under ``state_dir``, or start one (replacing a stale one)."""
    where = home(state_dir)
    where.mkdir(parents=True, exist_ok=True)
    with _start_lock(where):
        record = _read_state(where)
        replaced = ""
        if record is not None:
            state, reason = _probe(where, record)
            if state == "running":
                return Server(where, record["pid"], record["port"])
            replaced = reason
            _retire(where, record, hung=state == "hung")
        server = _start(where)
        return Server(where, server.pid, server.port, started=True, replaced=replaced)


def status(state_dir: Path) -> dict[str, object]:
    """The recorded server and whether it runs: running, stopped or stale (with why)."""
    where = home(state_dir)
    record = _read_state(where)
    row: dict[str, object] = {"server": "mongo", "state": "stopped", "address": None, "pid": None,
                              "data_dir": str(where / "data"), "log": str(where / "server.log"), "detail": ""}
    if record is not None:
        state, reason = _probe(where, record)
        row.update(state=state if state == "running" else "stale", address=f"{HOST}:{record['port']}",
                   pid=record["pid"], detail=reason)
    return row


def stop(state_dir: Path) -> str:
    """Stop the embedded server; return what happened: stopped, not running, or stale (cleared)."""
    where = home(state_dir)
    if not where.is_dir():
        return "not running"
    with _start_lock(where):
        record = _read_state(where)
        if record is None:
            return "not running"
        state, _ = _probe(where, record)
        _retire(where, record, hung=state == "hung")
        return "stale" if state == "stale" else "stopped"


# --- the state file and the start-up lock ------------------------------------------------------


def _read_state(where: Path) -> dict[str, int] | None:
    try:
        data = json.loads((where / "server.json").read_text())
        return {"pid": int(data["pid"]), "port": int(data["port"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no server recorded, or a file no run could have finished writing


def _write_state(where: Path, pid: int, port: int) -> None:
    tmp = where / "server.json.tmp"
    tmp.write_text(json.dumps({"pid": pid, "port": port}) + "\n")
    tmp.replace(where / "server.json")


@contextmanager
def _start_lock(where: Path) -> Iterator[None]:
    """Serialize start-up and stop, so two first runs never start two servers."""
    import fcntl

    with open(where / "start.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # bounded by the holder's own start-up wait
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- probing, starting and stopping -----------------------------------------------------------


def _probe(where: Path, record: dict[str, int]) -> tuple[str, str]:
    """("running", "") when the recorded pid is the server answering on the recorded port; ("hung", why)
    when that server runs but answers nothing; otherwise ("stale", why)."""
    pid, port = record["pid"], record["port"]
    answering = _answering_pid(port)
    if answering == pid and _is_ours(pid, where):
        return "running", ""
    if not _alive(pid):
        why = f"pid {pid} is not running"
    elif _is_ours(pid, where):
        return "hung", f"pid {pid} does not answer on port {port}"  # the port is still its own
    else:
        why = f"pid {pid} is no longer the embedded server"
    if answering is not None and answering != pid:
        why += f"; port {port} now belongs to another MongoDB server"
    elif answering is None and _listening(port):
        why += f"; port {port} now belongs to another process"
    return "stale", why


def _answering_pid(port: int) -> int | None:
    """The pid a MongoDB server on ``port`` reports, or None when nothing answers as one."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient = MongoClient(url_for(port), serverSelectionTimeoutMS=PROBE_TIMEOUT_MS,
                                      connectTimeoutMS=PROBE_TIMEOUT_MS, socketTimeoutMS=PROBE_TIMEOUT_MS)
    try:
        answer = client.admin.command("serverStatus")
        return int(answer.get("pid", -1))
    except (PyMongoError, TypeError, ValueError):
        return None
    finally:
        client.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_ours(pid: int, where: Path) -> bool:
    """Whether ``pid`` is a secantusd-py serving this directory's data (a pid may be reused)."""
    import psutil

    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return any(BINARY in arg for arg in argv) and str(where / "data") in argv


def _retire(where: Path, record: dict[str, int], *, hung: bool = False) -> None:
    """Stop the recorded server if it is still ours (kill it when it answers nothing), and forget it."""
    pid = record["pid"]
    if _alive(pid) and _is_ours(pid, where):
        _terminate(pid, kill=hung)
    (where / "server.json").unlink(missing_ok=True)


def _terminate(pid: int, *, kill: bool = False) -> None:
    """Stop a server: TERM, then KILL after STOP_TIMEOUT; KILL at once for one that answers nothing
    (every committed write is synced, so nothing committed is lost)."""
    import psutil

    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
    except psutil.NoSuchProcess:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _start(where: Path) -> Server:
    """Start a detached server on a free port; retry on another port if that one was taken meanwhile."""
    program = binary()
    data, log = where / "data", where / "server.log"
    data.mkdir(exist_ok=True)
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        with open(log, "ab") as out:
            out.write(f"--- starting {BINARY} on {HOST}:{port}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                # --sync-on-commit: a killed server keeps every committed write, the ledger included.
                [str(program), "--host", HOST, "--port", str(port), "--storage-path", str(data),
                 "--sync-on-commit", "--cache-size", CACHE_SIZE],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=where,
                start_new_session=True)  # its own session: it outlives this command and its terminal
        outcome = _wait_ready(proc, port, log)
        if outcome == "ready":
            _write_state(where, proc.pid, port)
            return Server(where, proc.pid, port, started=True)
        if outcome == "port taken":
            continue
        if outcome == "timeout":
            _terminate(proc.pid)
            raise UnreachableError(f"mongo: the embedded server did not answer within {START_TIMEOUT:.0f} s; "
                                   f"see its log {log}, or set MONGODB_URL to another server")
        raise UnreachableError(f"mongo: the embedded server exited while starting ({outcome}); see its log "
                               f"{log}, or set MONGODB_URL to another server")
    raise UnreachableError(f"mongo: the embedded server found no free port in {START_ATTEMPTS} attempts; "
                           f"see its log {log}")


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> str:
    """ready, port taken, timeout, or how the process exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return "port taken" if _bind_failed(log) else f"exit code {code}"
        if _answering_pid(port) == proc.pid:
            return "ready"
        time.sleep(0.1)
    return "timeout"


def _bind_failed(log: Path) -> bool:
    """Whether the server's last start-up in the log ended on its port being in use."""
    try:
        last = log.read_text(errors="replace").rsplit(f"--- starting {BINARY}", 1)[-1]
    except OSError:
        return False
    return "Address already in use" in last
