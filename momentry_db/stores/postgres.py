"""PostgreSQL: per-schema Alembic runs.

Each target (one environment's schema) gets its own connection, an advisory lock
keyed by its schema, a search_path holding that schema only, its own
``alembic_version`` table and one transaction. Isolated operations run in every
target; shared operations only in public (see :mod:`momentry_db.revision`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..environments import Environment, scrub, validate_schema
from ..errors import ConfigError, StoreError, UnreachableError
from ..plan import Step, TargetPlan

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection, Engine

    from ..settings import Project

STORE = "postgres"
REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_LOCATION = REPO_ROOT / "migrations"
CONNECT_TIMEOUT_S = 5
LOCK_CLASS = 0x6D6F6D64  # "momd": namespaces our advisory locks
UNMANAGED = "tables created outside momentry-db (no alembic_version)"


@dataclass
class PgTarget:
    """One Alembic run: an environment's schema, and how to reach its database."""

    env: Environment
    emit: Callable[[str, Step], None] | None = None
    applied: list[str] = field(default_factory=list)
    started_at: tuple[str, ...] = ()
    _url: str | None = field(default=None, repr=False)
    embedded: bool = False

    @property
    def schema(self) -> str:
        return self.env.schema

    @property
    def primary(self) -> bool:
        return self.env.primary

    def url(self) -> str:
        """The SQLAlchemy URL, starting the embedded server when none is configured."""
        if self._url is None:
            if self.env.database_url is not None:
                self._url = self.env.database_url.reveal()
            else:
                from .embedded import embedded_url

                self._url = embedded_url(self.env.state_dir)
                self.embedded = True
        return self._url


def quote_ident(name: str) -> str:
    """Quote an identifier the way psycopg does, for SQL we emit as text."""
    from psycopg import sql

    return sql.Identifier(name).as_string(None)


def lock_sql(schema: str, *, xact: bool) -> str:
    """The advisory lock statement that serializes runs against one schema."""
    fn = "pg_advisory_xact_lock" if xact else "pg_advisory_lock"
    return f"SELECT {fn}({LOCK_CLASS}, hashtext({quote_literal(schema)}))"


def quote_literal(value: str) -> str:
    from psycopg import sql

    return sql.Literal(value).as_string(None)


def create_engine(url: str) -> Engine:
    """An engine for one migration run: no pooling, bounded connect time."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    return sa.create_engine(url, poolclass=NullPool,
                            connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def connect(target: PgTarget) -> Connection:
    """Open a connection for a target, turning connection failures into one clear line."""
    from sqlalchemy.exc import OperationalError

    url = target.url()
    try:
        return create_engine(url).connect()
    except OperationalError as exc:
        reason = scrub(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc),
                       target.env.secrets())
        where = "the embedded server" if target.embedded else target.env.database_url.masked  # type: ignore[union-attr]
        raise UnreachableError(f"postgres: cannot connect to {where}: {reason}") from None


# --- targets -------------------------------------------------------------------------------


def targets_for(envs: Iterable[Environment]) -> list[PgTarget]:
    """Targets for environments, public first."""
    ordered = sorted(envs, key=lambda e: not e.primary)
    return [PgTarget(env) for env in ordered]


def targets_from_x_args(project: Project, x_args: dict[str, str]) -> list[PgTarget]:
    """Targets for a plain ``alembic`` call: ``-x schema=NAME``, or every environment."""
    unknown = set(x_args) - {"schema"}
    if unknown:
        raise ConfigError(f"unknown -x option(s): {', '.join(sorted(unknown))}; only schema=NAME is accepted")
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


# --- env.py: one run per target -------------------------------------------------------------


def run_env(context: EnvironmentContext, targets: Sequence[PgTarget]) -> None:
    """What migrations/env.py does: run each target in turn."""
    if context.is_offline_mode():
        for target in targets:
            _run_offline(context, target)
        return
    for target in targets:
        _run_online(context, target, autogenerate_primary_only=len(targets) > 1)


def _metadata(context: EnvironmentContext) -> MetaData:
    """The models' metadata, or the one a caller passed in ``config.attributes``."""
    from ..models import metadata

    return context.config.attributes.get("momentry_metadata") or metadata


def _configure_kwargs(target: PgTarget, meta: MetaData) -> dict[str, Any]:
    from ..models.base import Scope
    from ..tables import include_object

    kwargs: dict[str, Any] = dict(
        target_metadata=meta,
        version_table_schema=target.schema,
        include_object=include_object(Scope.ISOLATED, meta),
        compare_type=True,
        compare_server_default=True,
        momentry_target=target,
    )
    kwargs["on_version_apply"] = _on_apply(target)
    return kwargs


def _on_apply(target: PgTarget) -> Callable[..., None]:
    def on_apply(*, ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
        if ctx.as_sql:  # offline mode only writes SQL; nothing was applied
            return
        target.applied.append(step.up_revision_id)
        if target.emit is not None:
            verb = "upgraded" if step.is_upgrade else "downgraded"
            doc = getattr(step.up_revision, "doc", "") or ""
            target.emit(verb, Step(STORE, target.env.name, target.schema, step.up_revision_id, doc))

    return on_apply


def _run_offline(context: EnvironmentContext, target: PgTarget) -> None:
    context.configure(dialect_name="postgresql", literal_binds=True, transactional_ddl=True,
                      **_configure_kwargs(target, _metadata(context)))
    impl = context.get_context().impl
    impl.static_output(f"-- momentry-db: environment {target.env.name}, schema {target.schema}")
    with context.begin_transaction():
        context.execute(lock_sql(target.schema, xact=True))
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}")
        context.execute(f"SET search_path TO {quote_ident(target.schema)}")
        context.run_migrations()


def _run_online(context: EnvironmentContext, target: PgTarget, *, autogenerate_primary_only: bool) -> None:
    import sqlalchemy as sa

    from ..models.base import Scope
    from ..tables import include_object

    conn = connect(target)
    try:
        conn.execute(sa.text(lock_sql(target.schema, xact=False)))
        conn.commit()
        meta = _metadata(context)
        kwargs = _configure_kwargs(target, meta)
        context.configure(connection=conn, **kwargs)
        opts = context.get_context().opts
        autogenerate = "revision_context" in opts
        if autogenerate:
            if autogenerate_primary_only and not target.primary:
                return  # public holds every table; comparing it once is enough
            from alembic_utils.replaceable_entity import register_entities

            from ..models import VIEWS

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
                    _set_search_path(conn, target.schema)
                    context.run_migrations()
            return
        with context.begin_transaction():
            if not opts.get("dont_mutate"):
                conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target.schema)}"))
            _set_search_path(conn, target.schema)
            target.applied.clear()
            target.started_at = tuple(context.get_context().get_current_heads())
            try:
                context.run_migrations()
            except Exception as exc:
                raise _store_error(context, target, exc) from None
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(sa.text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:s))"), {"s": target.schema})
            conn.commit()
        finally:
            conn.close()


def _strip_scope_info(context: Any, revision: Any, directives: list[Any]) -> None:
    """Keep the scope marking out of rendered create_table calls: the function says it."""
    from alembic.operations import ops

    from ..models import SCOPE_KEY

    for script in directives:
        for op_list in (*script.upgrade_ops_list, *script.downgrade_ops_list):
            for op in op_list.ops:
                if isinstance(op, ops.CreateTableOp):
                    op.info = {k: v for k, v in op.info.items() if k != SCOPE_KEY}


def _set_search_path(conn: Connection, schema: str) -> None:
    import sqlalchemy as sa

    # The target schema only: an unqualified name can never fall through to public.
    conn.execute(sa.text(f"SET search_path TO {quote_ident(schema)}"))


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


def _store_error(context: EnvironmentContext, target: PgTarget, exc: Exception) -> StoreError:
    """Name the revision that failed: the one after the last that applied."""
    orig = getattr(exc, "orig", None)
    lines = str(orig or exc).strip().splitlines() or [type(exc).__name__]
    reason = lines[0] if orig is not None else f"{type(exc).__name__}: {lines[0]}"
    current = target.applied[-1] if target.applied else (target.started_at[0] if target.started_at else None)
    step = "revision after " + current if current else "first revision"
    for rev in context.script.walk_revisions():
        if rev.down_revision == current or (current is None and rev.down_revision is None):
            step = f"revision {rev.revision} ({rev.doc})"
            break
    return StoreError(STORE, _label(target), step,
                      scrub(reason, target.env.secrets()))


# --- library calls --------------------------------------------------------------------------


def alembic_config(targets: Sequence[PgTarget], *, project: Project | None = None,
                   script_location: Path | None = None, output: io.StringIO | None = None,
                   metadata: MetaData | None = None) -> Config:
    """An Alembic Config that runs our env.py against the given targets."""
    from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(script_location or SCRIPT_LOCATION))
    cfg.set_main_option("version_path_separator", "os")
    cfg.attributes["momentry_targets"] = list(targets)
    cfg.attributes["momentry_project"] = project
    cfg.attributes["momentry_metadata"] = metadata
    return cfg


def _script(script_location: Path | None) -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(script_location or SCRIPT_LOCATION))


def current_heads(conn: Connection, schema: str) -> tuple[str, ...]:
    """The revisions recorded in a schema's alembic_version (empty when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
    return tuple(sorted(ctx.get_current_heads()))


def plan(target: PgTarget, *, with_sql: bool = False, script_location: Path | None = None,
         project: Project | None = None) -> TargetPlan:
    """Where a target stands and which revisions are pending, optionally with their SQL."""
    from alembic.util import CommandError

    script = _script(script_location)
    notes: tuple[str, ...] = ()
    with connect(target) as conn:
        current = current_heads(conn, target.schema)
        if not current:
            unmanaged = unmanaged_tables(conn, target.schema)
            if unmanaged:
                notes = (f"{UNMANAGED}: {', '.join(unmanaged[:5])}"
                         + (f" and {len(unmanaged) - 5} more" if len(unmanaged) > 5 else ""),)
    head = tuple(sorted(script.get_heads()))
    try:
        revisions = list(script.iterate_revisions("heads", current[0] if current else "base"))
    except CommandError as exc:
        raise StoreError(STORE, _label(target), "plan",
                         f"{exc}; is this checkout older than the database?") from None
    pending = tuple(Step(STORE, target.env.name, target.schema, r.revision, r.doc or "")
                    for r in reversed(revisions))
    sql = None
    if with_sql and pending:
        sql = offline_sql(target, f"{current[0]}:head" if current else "head",
                          script_location=script_location, project=project)
    return TargetPlan(STORE, target.env.name, target.schema, current, head, pending, sql, notes)


def offline_sql(target: PgTarget, revision_range: str, *, script_location: Path | None = None,
                project: Project | None = None) -> str:
    """The SQL an upgrade would run, as Alembic's offline mode writes it (psql-ready)."""
    from alembic import command

    out = io.StringIO()
    command.upgrade(alembic_config([target], project=project, script_location=script_location,
                                   output=out), revision_range, sql=True)
    return out.getvalue()


def upgrade(target: PgTarget, revision: str = "head", *, script_location: Path | None = None,
            project: Project | None = None) -> list[str]:
    """Upgrade one target; return the revisions applied."""
    from alembic import command

    command.upgrade(alembic_config([target], project=project, script_location=script_location), revision)
    return list(target.applied)


def downgrade(target: PgTarget, revision: str, *, script_location: Path | None = None,
              project: Project | None = None) -> list[str]:
    """Downgrade one target; return the revisions undone."""
    from alembic import command

    command.downgrade(alembic_config([target], project=project, script_location=script_location), revision)
    return list(target.applied)


def _label(target: PgTarget) -> str:
    return f"{target.env.name} (schema {target.schema})"


# --- environment management: reset, clone, adopt ---------------------------------------------

_EXTERNAL_DEPENDENTS = """
SELECT DISTINCT dep_ns.nspname || '.' || dep.relname || ' (view)'
FROM pg_depend d
JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
JOIN pg_class dep ON dep.oid = r.ev_class JOIN pg_namespace dep_ns ON dep_ns.oid = dep.relnamespace
JOIN pg_class ref ON d.refclassid = 'pg_class'::regclass AND ref.oid = d.refobjid
JOIN pg_namespace ref_ns ON ref_ns.oid = ref.relnamespace
WHERE ref_ns.nspname = :s AND dep_ns.nspname <> :s
UNION
SELECT DISTINCT src_ns.nspname || '.' || src.relname || ' (foreign key ' || c.conname || ')'
FROM pg_constraint c
JOIN pg_class src ON src.oid = c.conrelid JOIN pg_namespace src_ns ON src_ns.oid = src.relnamespace
JOIN pg_class dst ON dst.oid = c.confrelid JOIN pg_namespace dst_ns ON dst_ns.oid = dst.relnamespace
WHERE c.contype = 'f' AND dst_ns.nspname = :s AND src_ns.nspname <> :s
"""


def unmanaged_tables(conn: Connection, schema: str, meta: MetaData | None = None) -> list[str]:
    """Model tables that exist in a schema that has no alembic_version (created outside Alembic)."""
    import sqlalchemy as sa

    from ..models import metadata

    names = sorted((meta or metadata).tables)
    rows = conn.execute(sa.text(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s "
        "AND table_name = ANY(:names)"), {"s": schema, "names": names})
    return sorted(r[0] for r in rows)


def drop_schema(target: PgTarget) -> bool:
    """Drop a non-primary environment's schema; refuse when anything outside it depends on it."""
    import sqlalchemy as sa

    from ..errors import RefusedError

    if target.primary:
        raise RefusedError("postgres: the public schema is never dropped")
    with connect(target) as conn:
        conn.execute(sa.text(lock_sql(target.schema, xact=True)))
        exists = conn.execute(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :s"),
                              {"s": target.schema}).first()
        if not exists:
            conn.rollback()
            return False
        outside = [r[0] for r in conn.execute(sa.text(_EXTERNAL_DEPENDENTS), {"s": target.schema})]
        if outside:
            conn.rollback()
            raise RefusedError(f"postgres: objects outside schema {target.schema} depend on it "
                               f"({', '.join(outside)}); dropping it would cascade into them")
        conn.execute(sa.text(f"DROP SCHEMA {quote_ident(target.schema)} CASCADE"))
        conn.commit()
    return True


def clone_tables(source: PgTarget, dest: PgTarget, tables: Sequence[str], limit: int | None,
                 emit: Callable[[str, Any], None] | None = None) -> dict[str, int]:
    """Copy isolated tables between two schemas of one database, in one transaction, in FK order.

    Rows whose foreign keys point at rows not present in the destination are left
    out, so a ``limit`` never breaks a foreign key.
    """
    import sqlalchemy as sa
    from psycopg import sql

    from ..errors import ConfigError
    from ..models import metadata

    if source.url() != dest.url():
        raise ConfigError("clone copies PostgreSQL tables within one database; "
                          f"{source.env.name} and {dest.env.name} use different DATABASE_URLs")
    ordered = [t for t in metadata.sorted_tables if t.name in set(tables)]
    counts: dict[str, int] = {}
    src, dst = source.schema, dest.schema
    with connect(dest) as conn:
        conn.execute(sa.text(lock_sql(dst, xact=True)))
        names = sql.SQL(", ").join(sql.Identifier(dst, t.name) for t in ordered)
        conn.exec_driver_sql(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(names).as_string(None))
        for table in ordered:
            cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
            conditions = []
            for fk in table.foreign_key_constraints:
                local = [sql.Identifier(c.name) for c in fk.columns]
                remote = [sql.Identifier(e.column.name) for e in fk.elements]
                parent = sql.Identifier(dst, fk.referred_table.name)
                conditions.append(sql.SQL("({nulls} OR ({local}) IN (SELECT {remote} FROM {parent}))").format(
                    nulls=sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(c) for c in local),
                    local=sql.SQL(", ").join(local), remote=sql.SQL(", ").join(remote), parent=parent))
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
            pk = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.primary_key.columns)
            query = sql.SQL("INSERT INTO {dst} ({cols}) OVERRIDING SYSTEM VALUE "
                            "SELECT {cols} FROM {src}{where} ORDER BY {pk}{limit}").format(
                dst=sql.Identifier(dst, table.name), src=sql.Identifier(src, table.name), cols=cols,
                where=where, pk=pk,
                limit=sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit is not None else sql.SQL(""))
            counts[table.name] = conn.exec_driver_sql(query.as_string(None)).rowcount
            for column in table.primary_key.columns:
                if column.identity is not None:
                    conn.exec_driver_sql(sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({t}, {c}), coalesce(max({ci}), 0) + 1, false) "
                        "FROM {tbl}").format(t=sql.Literal(f"{quote_ident(dst)}.{quote_ident(table.name)}"),
                                             c=sql.Literal(column.name), ci=sql.Identifier(column.name),
                                             tbl=sql.Identifier(dst, table.name)).as_string(None))
            if emit is not None:
                emit("copied", {"store": STORE, "target": f"{dst}.{table.name}", "count": counts[table.name]})
        conn.commit()
    return counts


def compare_live(target: PgTarget, meta: MetaData | None = None) -> list[str]:
    """Differences between a live schema and the models, as autogenerate sees them."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from ..models import VIEWS, metadata
    from ..models.base import Scope
    from ..tables import include_object

    meta = meta or metadata
    isolated = include_object(Scope.ISOLATED, meta)
    shared = include_object(Scope.SHARED, meta)

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "view":
            return False  # views are compared by name below
        if target.primary:
            return isolated(obj, name, type_, reflected, compare_to) or shared(obj, name, type_, reflected, compare_to)
        return isolated(obj, name, type_, reflected, compare_to)

    with connect(target) as conn:
        _set_search_path(conn, target.schema)
        ctx = MigrationContext.configure(conn, opts={
            "include_object": include, "include_schemas": False, "compare_type": True,
            "compare_server_default": True,
            "target_metadata": meta})
        diffs = [_describe(d) for d in compare_metadata(ctx, meta)]
        if target.primary:
            live = {r[0] for r in conn.execute(sa.text(
                "SELECT viewname FROM pg_views WHERE schemaname = 'public'"))}
            diffs += [f"missing view {v.signature}" for v in VIEWS if v.signature not in live]
        conn.rollback()
    return diffs


def _describe(diff: Any) -> str:
    """One line for an autogenerate difference tuple."""
    if isinstance(diff, list):
        return "; ".join(_describe(d) for d in diff)
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        return f"{'missing' if kind == 'add_table' else 'unexpected'} table {diff[1].name}"
    if kind in ("add_column", "remove_column"):
        return f"{'missing' if kind == 'add_column' else 'unexpected'} column {diff[2]}.{diff[3].name}"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        obj = diff[1]
        what = kind.split("_", 1)[1].replace("fk", "foreign key")
        state = "missing" if kind.startswith("add") else "unexpected"
        return f"{state} {what} {obj.name} on {obj.table.name}"
    if kind.startswith("modify_"):
        return f"{kind.replace('modify_', '')} of {diff[2]}.{diff[3]}: {diff[5]!r} in the database, {diff[6]!r} in the models"
    return str(diff)


def stamp(target: PgTarget, revision: str = "head", *, script_location: Path | None = None,
          project: Project | None = None) -> None:
    """Record a revision as applied without running it."""
    from alembic import command

    command.stamp(alembic_config([target], project=project, script_location=script_location), revision)
