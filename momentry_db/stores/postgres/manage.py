"""Reset, clone and adopt: unmanaged tables, dropping a schema with its dependents, copying, live comparison."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection


from .connection import (
    LOCK_CLASS,
    STORE,
    PgTarget,
    acquire_lock,
    connect,
    label,
    lock_holder,
    quote_ident,
    set_search_path,
)

# --- environment management: reset, clone, adopt ---------------------------------------------

_EXTERNAL_DEPENDENTS = """
WITH inside AS (
    SELECT 'pg_class'::regclass AS cls, c.oid FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s
    UNION ALL
    SELECT 'pg_type'::regclass, t.oid FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = :s
    UNION ALL
    SELECT 'pg_proc'::regclass, p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s
), dependents AS (
    SELECT d.classid, d.objid, d.objsubid,
           CASE d.classid
             WHEN 'pg_class'::regclass THEN (SELECT relnamespace FROM pg_class WHERE oid = d.objid)
             WHEN 'pg_attrdef'::regclass THEN (SELECT c.relnamespace FROM pg_attrdef a
                                               JOIN pg_class c ON c.oid = a.adrelid WHERE a.oid = d.objid)
             WHEN 'pg_rewrite'::regclass THEN (SELECT c.relnamespace FROM pg_rewrite r
                                               JOIN pg_class c ON c.oid = r.ev_class WHERE r.oid = d.objid)
             WHEN 'pg_constraint'::regclass THEN (SELECT coalesce(c.relnamespace, k.connamespace)
                                                  FROM pg_constraint k LEFT JOIN pg_class c ON c.oid = k.conrelid
                                                  WHERE k.oid = d.objid)
             WHEN 'pg_trigger'::regclass THEN (SELECT c.relnamespace FROM pg_trigger t
                                               JOIN pg_class c ON c.oid = t.tgrelid WHERE t.oid = d.objid)
             WHEN 'pg_type'::regclass THEN (SELECT typnamespace FROM pg_type WHERE oid = d.objid)
             WHEN 'pg_proc'::regclass THEN (SELECT pronamespace FROM pg_proc WHERE oid = d.objid)
           END AS nsp
    FROM pg_depend d JOIN inside i ON d.refclassid = i.cls AND d.refobjid = i.oid
    WHERE d.deptype IN ('n', 'a')
)
SELECT DISTINCT pg_describe_object(classid, objid, objsubid) FROM dependents
WHERE nsp IS DISTINCT FROM (SELECT oid FROM pg_namespace WHERE nspname = :s)
ORDER BY 1
"""


_CROSS_INHERITANCE = """
SELECT format('%I.%I is a %s of %I.%I', cn.nspname, c.relname,
              CASE WHEN c.relispartition THEN 'partition' ELSE 'child (INHERITS)' END, pn.nspname, p.relname)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.relkind IN ('r', 'p', 'f') AND (cn.nspname = :s) <> (pn.nspname = :s)
ORDER BY 1
"""

_SCHEMA_FACTS = """
SELECT pg_has_role(current_user, n.nspowner, 'MEMBER'),
       to_regclass(format('%I.alembic_version', n.nspname)) IS NOT NULL,
       ARRAY(SELECT relname::text FROM pg_class WHERE relnamespace = n.oid AND relkind IN ('r', 'p', 'v', 'm', 'f')
             ORDER BY relname LIMIT 5),
       EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = n.oid)
         OR EXISTS (SELECT 1 FROM pg_type WHERE typnamespace = n.oid)
         OR EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = n.oid)
FROM pg_namespace n WHERE n.nspname = :s
"""


def _check_droppable(conn: Connection, target: PgTarget) -> bool:
    """Refuse a drop that would reach past the environment; return whether the schema exists.

    The schema must be ours (an alembic_version, or nothing in it at all), droppable
    by this login, and tied to nothing outside it: no dependents, and no partition or
    inheritance link in either direction (a dropped child takes its parent's rows).
    """
    import sqlalchemy as sa

    from ...errors import RefusedError

    where = f"postgres {label(target)}"
    facts = conn.execute(sa.text(_SCHEMA_FACTS), {"s": target.schema}).first()
    if not conn.execute(sa.text("SELECT has_database_privilege(current_database(), 'CREATE')")).scalar():
        raise RefusedError(f"{where}: this login may not create schemas in the database, so the schema could "
                           "not be created again; grant it CREATE on the database or use its owner's login")
    if facts is None:
        return False
    may_drop, managed, relations, non_empty = facts
    if non_empty and not managed:
        held = ", ".join(relations) if relations else "objects"
        raise RefusedError(f"{where}: the schema holds {held} but no alembic_version, so momentry-db does not "
                           "manage it and never drops it; check DATABASE_SCHEMA, or move its contents away")
    if not may_drop:
        raise RefusedError(f"{where}: this login does not own the schema and may not drop it; run reset with "
                           "the schema owner's login")
    linked = [r[0] for r in conn.execute(sa.text(_CROSS_INHERITANCE), {"s": target.schema})]
    if linked:
        raise RefusedError(f"{where}: partitions or inherited tables cross the schema's boundary "
                           f"({', '.join(linked[:5])}); dropping it would delete rows of tables outside it; "
                           "DETACH PARTITION or NO INHERIT them first")
    outside = [r[0] for r in conn.execute(sa.text(_EXTERNAL_DEPENDENTS), {"s": target.schema})]
    if outside:
        raise RefusedError(f"{where}: objects outside schema {target.schema} depend on it "
                           f"({', '.join(outside[:5])}); dropping it would cascade into them")
    return True


def preflight_drop(target: PgTarget) -> bool:
    """Check that drop_schema would succeed now, without waiting or writing; return whether the schema exists."""
    import sqlalchemy as sa

    from ...errors import RefusedError

    if target.primary:
        raise RefusedError("postgres: the public schema is never dropped")
    with connect(target) as conn:
        got = conn.execute(sa.text(f"SELECT pg_try_advisory_lock({LOCK_CLASS}, hashtext(:s))"),
                           {"s": target.schema}).scalar()
        conn.commit()
        if not got:
            raise RefusedError(f"postgres {label(target)}: migration lock held by "
                               f"{lock_holder(conn, target)}; retry when it finishes")
        try:
            return _check_droppable(conn, target)
        finally:
            _unlock(conn, target)


def drop_schema(target: PgTarget) -> bool:
    """Drop a non-primary environment's schema; refuse when it is not ours or reaches outside itself."""
    import sqlalchemy as sa

    from ...errors import RefusedError

    if target.primary:
        raise RefusedError("postgres: the public schema is never dropped")
    with connect(target) as conn:
        acquire_lock(conn, target)
        try:
            if not _check_droppable(conn, target):
                conn.rollback()
                return False
            conn.execute(sa.text(f"DROP SCHEMA {quote_ident(target.schema)} CASCADE"))
            conn.commit()
        finally:
            _unlock(conn, target)
    return True


def _unlock(conn: Connection, target: PgTarget) -> None:
    import sqlalchemy as sa

    if conn.in_transaction():
        conn.rollback()
    conn.execute(sa.text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:s))"), {"s": target.schema})
    conn.commit()


def clone_tables(source: PgTarget, dest: PgTarget, tables: Sequence[str], limit: int | None,
                 emit: Callable[[str, Any], None] | None = None) -> dict[str, int]:
    """Copy isolated tables between two schemas of one database, in one transaction, in FK order.

    Rows whose foreign keys point at rows not present in the destination are left
    out, so a ``limit`` never breaks a foreign key.
    """

    from ...errors import ConfigError
    from ...models import metadata

    if source.url() != dest.url():
        raise ConfigError("clone copies PostgreSQL tables within one database; "
                          f"{source.env.name} and {dest.env.name} use different DATABASE_URLs")
    ordered = [t for t in metadata.sorted_tables if t.name in set(tables)]
    counts: dict[str, int] = {}
    src, dst = source.schema, dest.schema
    with connect(dest) as conn:
        acquire_lock(conn, dest)
        try:
            _copy_tables(conn, ordered, src, dst, limit, counts, emit)
        finally:
            _unlock(conn, dest)
    return counts


def _copy_tables(conn: Connection, ordered: list[Any], src: str, dst: str, limit: int | None,
                 counts: dict[str, int], emit: Callable[[str, Any], None] | None) -> None:
    from psycopg import sql

    # One transaction: every table is copied, or none.
    names = sql.SQL(", ").join(sql.Identifier(dst, t.name) for t in ordered)
    conn.exec_driver_sql(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(names).as_string(None))
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


def compare_live(target: PgTarget, meta: MetaData | None = None) -> list[str]:
    """Differences between a live schema and the models, as autogenerate sees them."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from ...models import VIEWS, metadata
    from ...models.base import Scope
    from ...tables import include_object

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
        set_search_path(conn, target.schema)
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
