"""What migrations/env.py calls: targets from -x arguments, one online or offline run per target."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...environments import Environment, scrub, validate_schema
from ...errors import (
    ConfigError,
    MomentryError,
    RefusedError,
    StoreError,
)
from ...plan import Step

if TYPE_CHECKING:
    from alembic.runtime.environment import EnvironmentContext
    from sqlalchemy import MetaData
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
    lock_sql,
    quote_ident,
    session_settings_sql,
    set_search_path,
    tables_with_rows,
)
from .history import HISTORY_DDL, HISTORY_INSERT, record_failure
from .planning import RESULTS, current_heads

# --- targets -------------------------------------------------------------------------------


def targets_for(envs: Iterable[Environment]) -> list[PgTarget]:
    """Targets for environments, public first."""
    ordered = sorted(envs, key=lambda e: not e.primary)
    return [PgTarget(env) for env in ordered]


def targets_from_x_args(project: Project, x_args: dict[str, str]) -> list[PgTarget]:
    """Targets for a plain ``alembic`` call: ``-x schema=NAME``, or every environment."""
    unknown = set(x_args) - {"schema", "confirm"}
    if unknown:
        raise ConfigError(f"unknown -x option(s): {', '.join(sorted(unknown))}; "
                          "only schema=NAME and confirm=NAME are accepted")
    schema = x_args.get("schema")
    envs = project.environments()
    if schema is None:
        return targets_for(envs)
    validate_schema(schema, primary=(schema == "public"))
    for env in envs:
        if env.schema == schema:
            return targets_for([env])
    known = ", ".join(f"{e.schema} ({e.name})" for e in envs)
    raise ConfigError(f"-x schema={schema} is not the schema of a configured environment; known: {known}")


def to_head(context: EnvironmentContext) -> bool:
    """Whether an Alembic command's destination is the head (``head``, ``heads`` or its revision id)."""
    destination = context.get_revision_argument()
    wanted = destination if isinstance(destination, tuple) else (destination,)
    return set(wanted) == set(context.script.get_heads())


def refuse_unconfirmed_downgrade(context: EnvironmentContext, targets: Sequence[PgTarget],
                                 x_args: dict[str, str]) -> None:
    """Plain ``alembic downgrade`` runs on one named schema, and with consent where it can lose data.

    A downgrade may drop tables, so it never fans out over every environment, and it
    needs ``-x confirm=SCHEMA`` on public or on a schema whose tables hold rows.
    """
    cmd = getattr(context.config.cmd_opts, "cmd", None)
    if context.is_offline_mode() or not cmd or getattr(cmd[0], "__name__", "") != "downgrade":
        return
    if "schema" not in x_args:
        raise RefusedError("alembic downgrade runs on one schema: name it with -x schema=NAME "
                           "(and -x confirm=NAME where tables hold rows, and for public)")
    (target,) = targets
    populated = tables_with_rows(target)
    if (target.primary or populated) and x_args.get("confirm") != target.schema:
        held = f"; tables holding rows: {', '.join(populated[:5])}" if populated else ""
        raise RefusedError(f"alembic downgrade of schema {target.schema} may drop data{held}; "
                           f"add -x confirm={target.schema} to go ahead; nothing was changed")



# --- env.py: one run per target -------------------------------------------------------------


@dataclass
class _Progress:
    """One target's online run while it lasts: what Alembic's hooks saw, read into its SchemaRun."""

    applied: list[str] = field(default_factory=list)
    started_at: tuple[str, ...] = ()  # the revisions recorded before the run
    step_started: float = field(default_factory=time.monotonic)


def run_env(context: EnvironmentContext, targets: Sequence[PgTarget]) -> dict[str, SchemaRun]:
    """What migrations/env.py does: run each target in turn; return what each run did, by schema.

    The results are also left in ``config.attributes``, where the caller of an Alembic
    command reads them (``planning.run_results``).
    """
    results: dict[str, SchemaRun] = context.config.attributes.setdefault(RESULTS, {})
    if context.is_offline_mode():
        for target in targets:
            _run_offline(context, target)
        return results
    keep_going = context.config.attributes.get("momentry_keep_going", False)
    for target in targets:
        progress = _Progress()
        try:
            _run_online(context, target, progress, autogenerate_primary_only=len(targets) > 1)
        except Exception as exc:  # noqa: BLE001 - in a fan-out, whatever stops a target is its outcome
            if not keep_going:
                raise
            results[target.schema] = SchemaRun(tuple(progress.applied), failure(target, exc))
        else:
            results[target.schema] = SchemaRun(tuple(progress.applied))
    return results


def failure(target: PgTarget, exc: BaseException, step: str = "upgrade") -> MomentryError:
    """An error that stopped one target, as that target's outcome (secrets scrubbed)."""
    if isinstance(exc, MomentryError):
        return exc
    lines = str(exc).strip().splitlines()
    reason = f"unexpected {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
    return StoreError(STORE, label(target), step, scrub(reason, target.env.secrets()))


def _metadata(context: EnvironmentContext) -> MetaData:
    """The models' metadata, or the one a caller passed in ``config.attributes``."""
    from ...models import metadata

    return context.config.attributes.get("momentry_metadata") or metadata


def configure_kwargs(target: PgTarget, meta: MetaData, progress: _Progress | None = None) -> dict[str, Any]:
    from ...models.base import Scope
    from ...tables import include_object

    kwargs: dict[str, Any] = dict(
        target_metadata=meta,
        version_table_schema=target.schema,
        include_object=include_object(Scope.ISOLATED, meta),
        compare_type=True,
        compare_server_default=True,
        momentry_target=target,
    )
    if progress is not None:  # offline mode only writes SQL: nothing is applied to record
        kwargs["on_version_apply"] = _on_apply(target, progress)
    return kwargs


def _on_apply(target: PgTarget, progress: _Progress) -> Callable[..., None]:
    def on_apply(*, ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
        if ctx.as_sql:  # offline mode only writes SQL; nothing was applied
            return
        import sqlalchemy as sa

        now = time.monotonic()
        doc = getattr(step.up_revision, "doc", "") or ""
        direction = "stamp" if step.is_stamp else "upgrade" if step.is_upgrade else "downgrade"
        # Recorded in the migration's own transaction: the row exists exactly when the step does.
        ctx.connection.execute(sa.text(HISTORY_INSERT.format(schema=quote_ident(target.schema))), {
            "env": target.env.name, "step": step.up_revision_id, "description": doc, "direction": direction,
            "ms": int((now - progress.step_started) * 1000),
            "outcome": "stamped" if step.is_stamp else "applied", "error": None})
        progress.step_started = now
        progress.applied.append(step.up_revision_id)
        if target.emit is not None:
            verb = "stamped" if step.is_stamp else "upgraded" if step.is_upgrade else "downgraded"
            target.emit(verb, Step(STORE, target.env.name, target.schema, step.up_revision_id, doc))

    return on_apply


def _run_offline(context: EnvironmentContext, target: PgTarget) -> None:
    context.configure(dialect_name="postgresql", literal_binds=True, transactional_ddl=True,
                      **configure_kwargs(target, _metadata(context)))
    impl = context.get_context().impl
    impl.static_output(f"-- momentry-db: environment {target.env.name}, schema {target.schema}")
    with context.begin_transaction():
        for statement in session_settings_sql(target.env):
            context.execute(statement)
        context.execute(lock_sql(target.schema, xact=True))
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}")
        context.execute(f"SET search_path TO {quote_ident(target.schema)}")
        context.run_migrations()


def _run_online(context: EnvironmentContext, target: PgTarget, progress: _Progress, *,
                autogenerate_primary_only: bool) -> None:
    import sqlalchemy as sa

    from ...models.base import Scope
    from ...tables import include_object

    conn = connect(target)
    try:
        acquire_lock(conn, target)
        meta = _metadata(context)
        kwargs = configure_kwargs(target, meta, progress)
        context.configure(connection=conn, **kwargs)
        opts = context.get_context().opts
        autogenerate = "revision_context" in opts
        if autogenerate:
            if autogenerate_primary_only and not target.primary:
                return  # public holds every table; comparing it once is enough
            from alembic_utils.replaceable_entity import register_entities

            from ...models import VIEWS

            register_entities(VIEWS)
            strays = _stray_tables(conn, target, context, meta)
            passes = [Scope.ISOLATED, Scope.SHARED] if target.primary else [Scope.ISOLATED]
            for scope in passes:
                context.configure(connection=conn, **{
                    **kwargs,
                    "include_object": include_object(scope, meta, strays=strays),
                    "upgrade_token": f"{scope.value}_upgrades",
                    "downgrade_token": f"{scope.value}_downgrades",
                    "process_revision_directives": _strip_scope_info,
                })
                with context.begin_transaction():
                    set_search_path(conn, target.schema)
                    context.run_migrations()
            return
        error: StoreError | None = None
        with context.begin_transaction():
            for statement in session_settings_sql(target.env):
                conn.execute(sa.text(statement))
            if not opts.get("dont_mutate"):
                conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}"))
                conn.execute(sa.text(HISTORY_DDL.format(schema=quote_ident(target.schema))))
            set_search_path(conn, target.schema)
            progress.started_at = tuple(context.get_context().get_current_heads())
            progress.step_started = time.monotonic()
            try:
                context.run_migrations()
            except Exception as exc:
                error = _store_error(context, target, progress, exc)
        if error is not None:
            record_failure(conn, target, error, progress.step_started)
            _keep_committed(conn, target, progress)
            raise error
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(sa.text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:s))"), {"s": target.schema})
            conn.commit()
        finally:
            conn.close()


def _keep_committed(conn: Connection, target: PgTarget, progress: _Progress) -> None:
    """After a failed run, keep in ``progress.applied`` only the revisions that stayed committed."""
    try:
        now = current_heads(conn, target.schema)
        conn.rollback()
    except Exception:  # noqa: BLE001 - unreadable: the failed transaction took everything with it
        now = ()
    if now == tuple(sorted(progress.started_at)) or not now:
        progress.applied.clear()
    elif now[0] in progress.applied:  # an autocommit block committed the revisions before it
        del progress.applied[progress.applied.index(now[0]) + 1:]


def _strip_scope_info(context: Any, revision: Any, directives: list[Any]) -> None:
    """Keep the scope marking out of rendered create_table calls: the function says it."""
    from alembic.operations import ops

    from ...models import SCOPE_KEY

    for script in directives:
        for op_list in (*script.upgrade_ops_list, *script.downgrade_ops_list):
            for op in op_list.ops:
                if isinstance(op, ops.CreateTableOp):
                    op.info = {k: v for k, v in op.info.items() if k != SCOPE_KEY}


def _stray_tables(conn: Connection, target: PgTarget, context: EnvironmentContext,
                  meta: MetaData) -> frozenset[str]:
    """Undeclared tables that live in an environment schema (so are isolated, not shared)."""
    import sqlalchemy as sa

    declared = set(meta.tables)
    if target.primary:
        schemas = [s for s in _configured_schemas(context) if s != target.schema]
    else:
        schemas = [target.schema]
    if not schemas:
        return frozenset()
    rows = conn.execute(sa.text(
        "SELECT DISTINCT table_name FROM information_schema.tables "
        "WHERE table_schema = ANY(:schemas) AND table_type = 'BASE TABLE'"), {"schemas": schemas})
    return frozenset(r[0] for r in rows if r[0] not in declared and r[0] != "alembic_version")


def _configured_schemas(context: EnvironmentContext) -> list[str]:
    project = context.config.attributes.get("momentry_project")
    if project is None:
        return []
    return [e.schema for e in project.environments()]


def _store_error(context: EnvironmentContext, target: PgTarget, progress: _Progress,
                 exc: Exception) -> StoreError:
    """Name the revision that failed: the one after the last that applied."""
    orig = getattr(exc, "orig", None)
    lines = str(orig or exc).strip().splitlines() or [type(exc).__name__]
    reason = lines[0] if orig is not None else f"{type(exc).__name__}: {lines[0]}"
    current = progress.applied[-1] if progress.applied else (progress.started_at[0] if progress.started_at else None)
    step = "revision after " + current if current else "first revision"
    for rev in context.script.walk_revisions():
        if rev.down_revision == current or (current is None and rev.down_revision is None):
            step = f"revision {rev.revision} ({rev.doc})"
            break
    return StoreError(STORE, label(target), step,
                      scrub(reason, target.env.secrets()))
