"""The embedded PostgreSQL server (pgserver), used when no DATABASE_URL is configured."""

from __future__ import annotations

import warnings
from pathlib import Path

EMBEDDED_DATABASE = "momentry"


def _pgserver():  # type: ignore[no-untyped-def]
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it is harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver


def embedded_url(state_dir: Path) -> str:
    """Start (or reuse) the embedded server under ``state_dir`` and return its URL.

    The server keeps running after the command ends, so later commands reuse it;
    ``momentry-db embedded stop`` stops it.
    """
    import fcntl

    pgserver = _pgserver()
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "pg.start.lock", "a+") as lock:  # concurrent first runs start one server
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            server = pgserver.get_server(state_dir / "pg", cleanup_mode=None)
            _ensure_database(server.get_uri(), EMBEDDED_DATABASE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    uri: str = server.get_uri(EMBEDDED_DATABASE)
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def _ensure_database(admin_uri: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):  # created meanwhile
                pass


def embedded_status(state_dir: Path) -> dict[str, object]:
    """The embedded server's address, data directory, pid and state (running, stopped or stale)."""
    pgdata = state_dir / "pg"
    row: dict[str, object] = {"server": "postgres", "state": "stopped", "address": None, "pid": None,
                              "data_dir": str(pgdata), "log": str(pgdata / "log"), "detail": ""}
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir, host = int(lines[0]), lines[3].strip(), lines[4].strip(), lines[5].strip()
    except (OSError, ValueError, IndexError):
        return row
    import psutil

    row["pid"] = pid
    row["address"] = f"{host}:{port}" if host else f"{socket_dir} (socket, port {port})"
    try:
        running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        running = False
    row["state"] = "running" if running else "stale"
    row["detail"] = "" if running else f"pid {pid} is not running"
    return row


def stop_embedded(state_dir: Path) -> bool:
    """Stop the embedded server if it is running; return whether one was running."""
    pgdata = state_dir / "pg"
    if not (pgdata / "postmaster.pid").exists():
        return False
    pgserver = _pgserver()
    from pgserver._commands import pg_ctl

    server = pgserver.get_server(pgdata, cleanup_mode=None)
    pg_ctl(["-w", "stop"], pgdata=server.pgdata, user=server.system_user)
    return True
