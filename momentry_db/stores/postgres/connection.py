"""PostgreSQL targets and connections: PgTarget, connect, quoting, advisory locks, session settings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ...environments import Environment, scrub
from ...errors import (
    ConfigError,
    LockTimeoutError,
    MomentryError,
    StoreError,
    UnreachableError,
)
from ...locks import HeldLock
from ...plan import Step

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine



STORE = "postgres"
REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT_LOCATION = REPO_ROOT / "migrations"
CONNECT_TIMEOUT_S = 5
LOCK_CLASS = 0x6D6F6D64  # "momd": namespaces our advisory locks
UNMANAGED = "tables created outside momentry-db (no alembic_version)"

@dataclass(frozen=True)
class PgTarget:
    """One Alembic run's settings: an environment's schema, and how to reach its database.

    A target is never written to: what a run did to it comes back as a :class:`SchemaRun`.
    """

    env: Environment
    emit: Callable[[str, Step], None] | None = None
    lock_wait: float = 30.0  # seconds to wait for another run's advisory lock on this schema

    @property
    def schema(self) -> str:
        return self.env.schema

    @property
    def primary(self) -> bool:
        return self.env.primary

    @property
    def embedded(self) -> bool:
        """Whether the embedded server is used: no DATABASE_URL is configured."""
        return self.env.database_url is None

    def url(self) -> str:
        """The SQLAlchemy URL, starting the embedded server when none is configured."""
        return self._url

    @cached_property
    def _url(self) -> str:
        # Computed once per target (starting the embedded server is not free); a cache, not state.
        if self.env.database_url is not None:
            return self.env.database_url.reveal()
        if not self.env.embedded:
            raise ConfigError("DATABASE_URL is not set and MOMENTRY_EMBEDDED=off turns the embedded "
                              "PostgreSQL off; set DATABASE_URL, or unset MOMENTRY_EMBEDDED to use the "
                              "embedded server")
        from ..embedded import embedded_url

        return embedded_url(self.env.state_dir)


@dataclass(frozen=True)
class SchemaRun:
    """What one run did to a target: the revisions it applied (or undid, or stamped), in order, and
    the error that stopped it, where a fan-out makes each target's failure its own outcome."""

    applied: tuple[str, ...] = ()
    error: MomentryError | None = None


def quote_ident(name: str) -> str:
    """Quote an identifier the way psycopg does, for SQL we emit as text."""
    from psycopg import sql

    return sql.Identifier(name).as_string(None)


def lock_sql(schema: str, *, xact: bool) -> str:
    """The advisory lock statement that serializes runs against one schema."""
    fn = "pg_advisory_xact_lock" if xact else "pg_advisory_lock"
    return f"SELECT {fn}({LOCK_CLASS}, hashtext({quote_literal(schema)}))"


_LOCK_HOLDER = """
SELECT a.application_name, a.pid, coalesce(host(a.client_addr), 'local'), a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = CAST(:c AS oid)
  AND l.objid = (hashtext(:s)::bigint & 4294967295)::text::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def acquire_lock(conn: Connection, target: PgTarget) -> None:
    """Take the schema's session advisory lock, waiting at most ``target.lock_wait`` seconds."""
    import sqlalchemy as sa


    deadline = time.monotonic() + target.lock_wait
    while True:
        got = conn.execute(sa.text(f"SELECT pg_try_advisory_lock({LOCK_CLASS}, hashtext(:s))"),
                           {"s": target.schema}).scalar()
        conn.commit()
        if got:
            return
        if time.monotonic() >= deadline:
            raise LockTimeoutError(f"postgres {target.env.name} (schema {target.schema}): migration lock "
                                   f"held by {lock_holder(conn, target)} for over {target.lock_wait:g}s; "
                                   "retry when it finishes")
        time.sleep(0.1)


def lock_holder(conn: Connection, target: PgTarget) -> str:
    """Who holds the schema's advisory lock, as a person would recognise the session."""
    import sqlalchemy as sa

    row = conn.execute(sa.text(_LOCK_HOLDER), {"c": str(LOCK_CLASS), "s": target.schema}).first()
    conn.commit()
    return (f"{row[0] or 'a session'} (pid {row[1]}, from {row[2]}, since "
            f"{row[3]:%Y-%m-%d %H:%M:%S})") if row else "another session"


def session_settings_sql(env: Environment) -> list[str]:
    """Timeouts every migration session runs with, so DDL never queues forever behind the app."""
    return [f"SET lock_timeout = {quote_literal(env.pg_lock_timeout)}",
            f"SET statement_timeout = {quote_literal(env.pg_statement_timeout)}"]


def quote_literal(value: str) -> str:
    from psycopg import sql

    return sql.Literal(value).as_string(None)


def create_engine(url: str, application_name: str = "momentry-db") -> Engine:
    """An engine for one migration run: no pooling, bounded connect time, a name in pg_stat_activity."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    return sa.create_engine(url, poolclass=NullPool,
                            connect_args={"connect_timeout": CONNECT_TIMEOUT_S,
                                          "application_name": application_name})


def connect(target: PgTarget) -> Connection:
    """Open a connection for a target, turning connection failures into one clear line."""
    from sqlalchemy.exc import OperationalError

    url = target.url()
    try:
        return create_engine(url, f"momentry-db {target.env.name} pid {os.getpid()}").connect()
    except OperationalError as exc:
        reason = scrub(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc),
                       target.env.secrets())
        where = "the embedded server" if target.embedded else target.env.database_url.masked  # type: ignore[union-attr]
        raise UnreachableError(f"postgres: cannot connect to {where}: {reason}") from None


def tables_with_rows(target: PgTarget) -> list[str]:
    """The schema's tables (bookkeeping aside) that hold at least one row, by name."""
    from sqlalchemy import text

    from ...tables import BOOKKEEPING_TABLES

    with connect(target) as conn:
        names = conn.execute(text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') ORDER BY c.relname"),
            {"schema": target.schema}).scalars().all()
        return [name for name in names if name not in BOOKKEEPING_TABLES and conn.execute(text(
            f"SELECT EXISTS (SELECT 1 FROM {quote_ident(target.schema)}.{quote_ident(name)})")).scalar()]



# --- unlock ----------------------------------------------------------------------------------

_LOCK_SESSIONS = """
SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local'), a.backend_start, a.state
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = CAST(:c AS oid)
  AND l.objid = (hashtext(:s)::bigint & 4294967295)::text::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY a.pid
"""
APP_NAME = "momentry-db"


def held_locks(target: PgTarget) -> list[HeldLock]:
    """The backends holding the schema's migration lock (a session lock dies with its session)."""
    import sqlalchemy as sa

    label = f"{target.env.name} (schema {target.schema})"
    conn = connect(target)
    try:
        rows = conn.execute(sa.text(_LOCK_SESSIONS), {"c": str(LOCK_CLASS), "s": target.schema}).all()
    finally:
        conn.close()
    found = []
    for pid, app, client, since, state in rows:
        ours = (app or "").startswith(APP_NAME)
        found.append(HeldLock(
            "postgres", label,
            f"backend pid {pid} ({app or 'no application_name'}, from {client}, since "
            f"{since:%Y-%m-%d %H:%M:%S}, {state or 'unknown state'})",
            releasable=ours, token=pid,
            why_not="" if ours else (f"backend pid {pid} is not a momentry-db session; end it yourself "
                                     f"(SELECT pg_terminate_backend({pid})) if it must go")))
    return found


def release_lock(target: PgTarget, lock: HeldLock) -> bool:
    """End the momentry-db backend shown in ``lock``, only while it still holds the schema's lock."""
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    conn = connect(target)
    try:
        ended = conn.execute(sa.text(
            "SELECT pg_terminate_backend(s.pid) FROM (" + _LOCK_SESSIONS + ") AS s(pid, app, client, since, state) "
            "WHERE s.pid = :pid AND s.app LIKE :app"),
            {"c": str(LOCK_CLASS), "s": target.schema, "pid": lock.token, "app": APP_NAME + "%"}).scalar()
        conn.commit()
    except DBAPIError as exc:
        reason = scrub(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc), target.env.secrets())
        raise StoreError("postgres", lock.target, f"ending backend pid {lock.token}", reason) from None
    finally:
        conn.close()
    if ended is False:
        raise StoreError("postgres", lock.target, f"ending backend pid {lock.token}",
                         "the server refused; connect as a superuser or a member of pg_signal_backend")
    return bool(ended)


def label(target: PgTarget) -> str:
    return f"{target.env.name} (schema {target.schema})"


def set_search_path(conn: Connection, schema: str) -> None:
    import sqlalchemy as sa

    # The target schema only: an unqualified name can never fall through to public.
    conn.execute(sa.text(f"SET search_path TO {quote_ident(schema)}"))
