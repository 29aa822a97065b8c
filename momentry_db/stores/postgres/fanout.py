"""Executors of a run over many schemas: Alembic in one process, compiled scripts, worker processes."""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...environments import Environment, scrub
from ...errors import (
    MomentryError,
    StoreError,
)
from ...plan import Step

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ...settings import Project

from .connection import (
    LOCK_CLASS,
    STORE,
    PgTarget,
    SchemaRun,
    acquire_lock,
    connect,
    label,
    quote_ident,
    session_settings_sql,
)
from .history import HISTORY_DDL, HISTORY_TABLE, record_failure
from .planning import Kept, Rev, alembic_config, load_script, run_results
from .runner import failure

# --- fan-out over many schemas ----------------------------------------------------------------


def current_versions(targets: Sequence[PgTarget]) -> dict[str, tuple[str, ...] | None]:
    """Every target's recorded revisions in two queries per database (None: never migrated)."""
    return read_states(targets)[0]


def read_states(targets: Sequence[PgTarget], kept: Kept | None = None,
                ) -> tuple[dict[str, tuple[str, ...] | None], dict[str, list[str]]]:
    """Every target's recorded revisions (None: never migrated) and, for a schema with none, the model
    tables it already holds (created outside momentry-db), in three queries per database and one
    snapshot, so a concurrent first run is seen whole or not at all. The models' table names come
    from ``kept`` when it has them."""
    import sqlalchemy as sa
    from psycopg import sql

    by_url: dict[str, list[PgTarget]] = {}
    for target in targets:
        by_url.setdefault(target.url(), []).append(target)
    versions: dict[str, tuple[str, ...] | None] = {}
    unmanaged: dict[str, list[str]] = {}
    for group in by_url.values():
        with connect(group[0]) as raw:
            conn = raw.execution_options(isolation_level="REPEATABLE READ")
            schemas = [t.schema for t in group]
            rows = conn.execute(sa.text(
                "SELECT s FROM unnest(CAST(:schemas AS text[])) AS s "
                "WHERE to_regclass(quote_ident(s) || '.alembic_version') IS NOT NULL"), {"schemas": schemas})
            managed = [r[0] for r in rows]
            versions.update({s: None for s in schemas})
            if managed:
                query = sql.SQL(" UNION ALL ").join(
                    sql.SQL("SELECT {name}, version_num FROM {table}").format(
                        name=sql.Literal(s), table=sql.Identifier(s, "alembic_version")) for s in managed)
                found: dict[str, list[str]] = {s: [] for s in managed}
                for schema, version in conn.exec_driver_sql(query.as_string(None)):
                    found[schema].append(version)
                versions.update({s: tuple(sorted(v)) for s, v in found.items()})
            bare = [s for s in schemas if not versions[s]]
            unmanaged.update({s: [] for s in bare})
            if bare:  # a no-op never asks for the models' tables
                names = (kept or Kept.open(None, None)).tables()
                for schema, table in conn.execute(sa.text(
                        "SELECT table_schema, table_name FROM information_schema.tables "
                        "WHERE table_schema = ANY(:schemas) AND table_name = ANY(:names)"),
                        {"schemas": bare, "names": names}):
                    unmanaged[schema].append(table)
                unmanaged = {s: sorted(t) for s, t in unmanaged.items()}
            conn.rollback()
    return versions, unmanaged


def upgrade_many(targets: Sequence[PgTarget], *, script_location: Path | None = None,
                 project: Project | None = None) -> dict[str, SchemaRun]:
    """Upgrade several targets in one Alembic run (one revision map, one env.py): what each run did,
    by schema; every target gets its own result, its failure included."""
    from alembic import command

    cfg = alembic_config(targets, project=project, script_location=script_location)
    cfg.attributes["momentry_keep_going"] = True
    stopped: BaseException | None = None
    try:
        command.upgrade(cfg, "head")
    except Exception as exc:  # noqa: BLE001 - before or between targets: each one not run reports it
        stopped = exc
    done = run_results(cfg)
    return {t.schema: done.get(t.schema) or SchemaRun(error=failure(t, stopped) if stopped else None)
            for t in targets}


def upgrade_chunk(envs: list[Environment], script_location: Path | None,
                  lock_wait: float) -> list[tuple[str, list[str], str | None]]:
    """A worker process's share of a parallel fan-out: (schema, applied, error) per target."""
    targets = [PgTarget(env, lock_wait=lock_wait) for env in envs]
    done = upgrade_many(targets, script_location=script_location)
    return [(schema, list(ran.applied), str(ran.error) if ran.error else None) for schema, ran in done.items()]



def upgrade_compiled(targets: Sequence[PgTarget], start: tuple[str, ...], *,
                     script_location: Path | None = None, parallel: int = 1,
                     on_commit: Callable[[PgTarget], None] | None = None, kept: Kept | None = None,
                     ) -> tuple[dict[str, SchemaRun], list[PgTarget]]:
    """Upgrade schemas that stand at the same revision, compiling the SQL once.

    The revision path is rendered once by Alembic's offline mode as schema-agnostic SQL (or taken
    from ``kept``, where it is kept between runs), then sent to each schema as one script in one
    transaction (search_path set to that schema, history rows included), under the schema's
    advisory lock. The targets are public alone (its script holds the shared operations too) or
    schemas other than public. With ``parallel`` > 1, that many connections (one thread each) take
    schemas from one queue. ``on_commit`` is called with each target whose script committed, from
    the lane that ran it. Returns what each compiled run did, by schema, and the targets left for a
    regular Alembic run: every one when the history is not one line or offline mode cannot express
    the path (a revision that reads the live database, holds an autocommit block or mentions
    offline mode), and any target another run moved meanwhile.
    """
    primary = {t.primary for t in targets}
    if len(primary) != 1:
        return {}, list(targets)
    kept = kept or Kept.open(None, script_location)
    revisions = kept.path(start)
    if revisions is None or not kept.compilable(start):
        return {}, list(targets)
    body = kept.template(start, primary.pop(), lambda: render_template(targets[0], start,
                                                                      load_script(script_location), script_location))
    if body is None:
        return {}, list(targets)
    work = _CompiledWork(start, _marked(body), revisions, on_commit)
    by_url: dict[str, list[PgTarget]] = {}
    for target in targets:
        by_url.setdefault(target.url(), []).append(target)
    for group in by_url.values():
        queue = deque(group)
        lanes = min(parallel, len(group))
        if lanes <= 1:
            work.drain(queue)
            continue
        threads = [threading.Thread(target=work.drain, args=(queue,), name=f"momentry-db lane {i + 1}")
                   for i in range(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    order = {t.schema: i for i, t in enumerate(targets)}
    return work.done, sorted(work.leftovers, key=lambda t: order[t.schema])


def render_template(target: PgTarget, start: tuple[str, ...], script: Any, script_location: Path | None) -> str | None:
    """The SQL of the path from ``start`` to head as Alembic's offline mode renders it, with unqualified
    names (search_path picks the schema), without its BEGIN and COMMIT; None when offline mode cannot
    express the path (it reads from the live database, or holds an autocommit block).

    The environment context is used directly, not through env.py and ``alembic.context``, so this
    also runs from inside env.py (a plain ``alembic upgrade head``) without disturbing its context.
    """
    from alembic.runtime.environment import EnvironmentContext

    from ...models import metadata
    from .runner import configure_kwargs

    out = io.StringIO()
    cfg = alembic_config([target], script_location=script_location, output=out)

    def upgrade(rev: Any, _context: Any) -> Any:
        return script._upgrade_revs("heads", rev)  # what alembic's command.upgrade passes as fn

    import logging

    quiet = logging.getLogger("alembic.runtime.migration")  # its "Generating static SQL" is not the user's run
    was = quiet.disabled
    quiet.disabled = True
    try:
        context = EnvironmentContext(cfg, script, fn=upgrade, as_sql=True, starting_rev=start[0] if start else None,
                                     destination_rev="heads")
        context.configure(dialect_name="postgresql", literal_binds=True, transactional_ddl=True, output_buffer=out,
                          **{**configure_kwargs(target, metadata), "version_table_schema": None})
        with context.begin_transaction():
            context.run_migrations()
    except Exception:  # noqa: BLE001 - the path needs the live database: no compiled run
        return None
    finally:
        quiet.disabled = was
    body = out.getvalue().strip()
    if not (body.startswith("BEGIN;") and body.endswith("COMMIT;")) or "COMMIT;" in body[6:-7]:
        return None  # an autocommit block: each schema runs through Alembic
    return body[6:-7].strip()


def upgrade_all(context: Any, targets: Sequence[PgTarget]) -> dict[str, SchemaRun]:
    """A plain ``alembic upgrade head`` over every configured environment, on migrate's path: every
    schema's version read in one snapshot, public first through this context, the schemas that stand
    at the same revision as one compiled script each, and the rest through this context one by one.

    Each compiled schema is logged (logger ``momentry_db``) as Alembic logs its own steps. As with
    Alembic, a failure stops the run with an error; every compiled schema's failure is named first.
    """
    import logging

    from .grants import Alongside
    from .planning import RESULTS
    from .runner import run_env

    log = logging.getLogger("momentry_db")
    results: dict[str, SchemaRun] = context.config.attributes.setdefault(RESULTS, {})
    location = Path(context.script.dir)
    versions, bare = read_states(targets)
    head = tuple(sorted(context.script.get_heads()))
    due = [t for t in targets if versions[t.schema] != head]
    run_env(context, [t for t in due if t.primary])
    starts: dict[tuple[str, ...], list[PgTarget]] = {}
    left: list[PgTarget] = []
    for t in due:
        if t.primary:
            continue
        if versions[t.schema] == () or bare.get(t.schema):  # downgraded to base, or tables it does not manage
            left.append(t)
        else:
            starts.setdefault(versions[t.schema] or (), []).append(t)
    failed: list[MomentryError] = []
    # grants made as the compiled schemas commit, for env.py's ensure_grants (see grants.Alongside)
    along = Alongside.for_run([t for group in starts.values() if len(group) > 1 for t in group])
    try:
        for start, group in starts.items():
            if len(group) == 1:
                left += group
                continue
            logged = [replace(t, emit=_log_step) for t in group]  # each revision as its schema commits
            runs, rest = upgrade_compiled(logged, start, script_location=location,
                                          on_commit=along.committed if along else None)
            left += [t for t in group if t.schema in {r.schema for r in rest}]
            for t in group:
                ran = runs.get(t.schema)
                if ran is None:
                    continue
                results[t.schema] = ran
                if ran.error is not None:
                    failed.append(ran.error)
                    log.error("%s", ran.error)
    finally:
        if along is not None:
            context.config.attributes[STREAMED] = along.finish()
    if failed:
        raise failed[0]
    order = {t.schema: i for i, t in enumerate(targets)}
    run_env(context, sorted(left, key=lambda t: order[t.schema]))
    return results


#: Where ``upgrade_all`` leaves the grants it made while the schemas ran (a ``grants.Streamed``).
STREAMED = "momentry_grants_streamed"


def _log_step(verb: str, step: Step) -> None:
    import logging

    logging.getLogger("momentry_db").info("Running upgrade -> %s, %s on schema %s (compiled)", step.name,
                                          step.description, step.target)


class _CompiledWork:
    """One compiled script and what its runs did; each lane drains the shared queue on its own connection."""

    def __init__(self, start: tuple[str, ...], body: str, revisions: list[Rev],
                 on_commit: Callable[[PgTarget], None] | None = None) -> None:
        self.start, self.body, self.revisions, self.on_commit = start, body, revisions, on_commit
        self.done: dict[str, SchemaRun] = {}
        self.leftovers: list[PgTarget] = []
        self.emitting = threading.Lock()  # lanes report one event at a time

    def drain(self, queue: deque[PgTarget]) -> None:
        """Take targets until the queue is empty; a target's failure is its own outcome, and the lane
        goes on, on a fresh connection if need be."""
        from psycopg import sql

        while queue:
            try:
                raw = connect(queue[0])
            except IndexError:
                return  # another lane took the last one
            except MomentryError as exc:  # unreachable: so is every target still waiting
                while True:
                    try:
                        self.done[queue.popleft().schema] = SchemaRun(error=exc)
                    except IndexError:
                        return
            with raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                while True:
                    try:
                        target = queue.popleft()
                    except IndexError:
                        return
                    try:
                        ran = _run_compiled(conn, target, self.start, self.body, self.revisions, sql,
                                            self.emitting)
                    except MomentryError as exc:
                        self.done[target.schema] = SchemaRun(error=exc)
                        continue
                    except Exception as exc:  # noqa: BLE001 - the connection may be unusable now
                        self.done[target.schema] = SchemaRun(error=failure(target, exc))
                        break
                    if ran is None:
                        self.leftovers.append(target)
                        continue
                    self.done[target.schema] = ran
                    if ran.error is None and self.on_commit is not None:
                        self.on_commit(target)


#: The notice a compiled script raises as each revision begins, so a failure names its revision.
MARK = "momentry-db revision "


def _marked(body: str) -> str:
    """The script with a notice where each revision's part begins, in place of the ``-- Running upgrade
    A -> B, description`` line Alembic's offline mode writes there (the one text of the script that
    is not SQL escaped for the driver, which reads ``%%`` as ``%``)."""
    import re

    from .connection import quote_literal

    return re.sub(r"^-- Running upgrade .*?-> (\S+?),? .*$|^-- Running upgrade .*?-> (\S+)$",
                  lambda m: "DO $momentry$ BEGIN RAISE NOTICE '%%', "
                            f"{quote_literal(MARK + (m.group(1) or m.group(2))).replace('%', '%%')}; END $momentry$;",
                  body, flags=re.M)


def _failed_step(revisions: list[Rev], heard: list[str]) -> str:
    """The step a failed script stopped in: the last revision it began, or the whole path when unknown."""
    failed = next((r for r in revisions if heard and r.revision == heard[-1]), None)
    if failed is None and len(revisions) == 1:
        failed = revisions[0]
    if failed is not None:
        return f"revision {failed.revision} ({failed.doc})"
    return f"revisions {revisions[0].revision}..{revisions[-1].revision}"


# SQLSTATEs the guard raises: the schema's lock is held by another session, or the schema moved since the plan
LOCKED = "MDLCK"
MOVED = "MDMOV"


def _guard_sql(target: PgTarget, start: tuple[str, ...]) -> str:
    """A DO block, first in the schema's transaction: take its lock without waiting, then (in a snapshot
    taken after the lock) check that its alembic_version still holds ``start``."""
    from .connection import quote_literal

    table = quote_literal(f"{quote_ident(target.schema)}.alembic_version")
    expected = "ARRAY[" + ", ".join(quote_literal(v) for v in sorted(start)) + "]::text[]"
    return (f"DO $momentry$\nDECLARE found text[] := '{{}}';\nBEGIN\n"
            f"  IF NOT pg_try_advisory_xact_lock({LOCK_CLASS}, hashtext({quote_literal(target.schema)})) THEN\n"
            f"    RAISE EXCEPTION 'migration lock held' USING ERRCODE = '{LOCKED}';\n  END IF;\n"
            f"  IF to_regclass({table}) IS NOT NULL THEN\n"
            f"    EXECUTE 'SELECT coalesce(array_agg(version_num::text ORDER BY version_num COLLATE \"C\"), ''{{}}'') "
            f"FROM ' || {table} INTO found;\n  END IF;\n"
            f"  IF found IS DISTINCT FROM {expected} THEN\n"
            f"    RAISE EXCEPTION 'moved since the plan' USING ERRCODE = '{MOVED}';\n  END IF;\nEND $momentry$")


def _run_compiled(conn: Connection, target: PgTarget, start: tuple[str, ...], body: str,
                  revisions: list[Rev], sql: Any, emitting: threading.Lock) -> SchemaRun | None:
    """Run the compiled script on one schema: what it did, or None when the schema moved since the plan.

    One round trip when nobody else holds the schema: the session settings, the transaction with
    the lock and revision guard, the script and its history rows, the commit and ``RESET ALL`` go
    as one simple-query message. When another session holds the lock, wait for it the usual way
    (``acquire_lock``, bounded by ``lock_wait``) and send the same message again.
    """
    import sqlalchemy as sa

    schema = sql.Identifier(target.schema)
    share = sql.SQL("CAST(extract(epoch FROM clock_timestamp() - now()) * 1000 / {} AS integer)").format(
        sql.Literal(len(revisions)))  # each step's equal share of the transaction's duration so far
    history = sql.SQL("").join(
        sql.SQL("INSERT INTO {}.{} (env, store, step, description, direction, duration_ms, outcome) "
                "VALUES ({}, 'postgres', {}, {}, 'upgrade', {}, 'applied');\n").format(
            schema, sql.Identifier(HISTORY_TABLE), sql.Literal(target.env.name),
            sql.Literal(r.revision), sql.Literal(r.doc or ""), share) for r in revisions)
    script = sql.SQL("{settings};\nSET client_min_messages = notice;\nBEGIN;\n{guard};\nCREATE SCHEMA IF NOT EXISTS {schema};\n"
                     "SET search_path TO {schema};\n{history_ddl};\n").format(
        settings=sql.SQL(";\n").join(sql.SQL(s) for s in session_settings_sql(target.env)),
        guard=sql.SQL(_guard_sql(target, start)),
        schema=schema, history_ddl=sql.SQL(HISTORY_DDL.format(schema=quote_ident(target.schema))))
    # the driver reads the script as a query with parameters (``%%`` for ``%``): Alembic's SQL is written
    # that way, and what is added to it here is escaped to match
    text = (script.as_string(None).replace("%", "%%") + body + "\n" + history.as_string(None).replace("%", "%%")
            + "COMMIT;\nRESET ALL;")
    locked = reset = False
    started = time.monotonic()
    heard: list[str] = []  # the revisions begun, from the script's notices

    def hear(diag: Any) -> None:
        if diag.message_primary and diag.message_primary.startswith(MARK):
            heard.append(diag.message_primary[len(MARK):])

    driver = conn.connection.dbapi_connection
    driver.add_notice_handler(hear)
    try:
        while True:
            heard.clear()
            try:
                conn.exec_driver_sql(text)
                reset = True
                break
            except sa.exc.DBAPIError as exc:
                conn.exec_driver_sql("ROLLBACK")
                state = getattr(exc.orig, "sqlstate", None)
                if state == MOVED:
                    return None  # moved by another run since the plan: Alembic takes it from here
                if state == LOCKED and not locked:
                    acquire_lock(conn, target)  # the session lock; the guard's own lock is then ours at once
                    locked = True
                    started = time.monotonic()
                    continue
                step = _failed_step(revisions, heard)
                reason = str(exc.orig or exc).strip().splitlines()[0]
                error = StoreError(STORE, label(target), step, scrub(reason, target.env.secrets()))
                record_failure(conn, target, error, started)
                return SchemaRun(error=error)
        if target.emit is not None:
            with emitting:
                for r in revisions:
                    target.emit("upgraded", Step(STORE, target.env.name, target.schema, r.revision, r.doc or ""))
        return SchemaRun(tuple(r.revision for r in revisions))
    finally:
        driver.remove_notice_handler(hear)
        if locked:
            conn.execute(sa.text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:s))"), {"s": target.schema})
        if not reset:
            conn.exec_driver_sql("RESET ALL")
