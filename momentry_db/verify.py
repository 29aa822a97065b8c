"""Isolation checks, store by store: the seed's step 4, made into a command.

Every check says pass, fail or "not checkable here", and a failure names the
violation. Nothing here reads private data: only catalogs, names and counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .environments import Environment, scrub

PASS, FAIL, NOT_CHECKABLE = "pass", "fail", "not checkable here"
MAX_SHOWN = 10  # violations listed per check; the rest are counted


@dataclass(frozen=True)
class Check:
    """The outcome of one isolation check."""

    store: str
    name: str
    status: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class VerifyResult:
    command: str
    env: str
    checks: list[Check] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def add(self, store: str, name: str, problems: Iterable[str] | None = None, *,
            ok_detail: str = "", status: str | None = None, detail: str = "") -> None:
        """Record a check: failed when ``problems`` has entries, else passed (or ``status``)."""
        problems = list(problems or [])
        if status is not None:
            self.checks.append(Check(store, name, status, detail))
        elif problems:
            shown = problems[:MAX_SHOWN] + ([f"and {len(problems) - MAX_SHOWN} more"]
                                            if len(problems) > MAX_SHOWN else [])
            self.checks.append(Check(store, name, FAIL, "; ".join(shown)))
        else:
            self.checks.append(Check(store, name, PASS, ok_detail))

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "env": self.env, "envs": [self.env], "ok": self.ok,
                "failed": [] if self.ok else [self.env],
                "checks": [{"env": self.env, **c.to_json()} for c in self.checks], "notices": self.notices}


@dataclass
class VerifyMany:
    """verify over several environments: each one's result, in order."""

    command: str
    results: list[VerifyResult]
    notices: list[str] = field(default_factory=list)

    @property
    def env(self) -> str:
        return ",".join(r.env for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.env for r in self.results if not r.ok]

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "env": self.env, "envs": [r.env for r in self.results], "ok": self.ok,
                "failed": self.failed,
                "checks": [{"env": r.env, **c.to_json()} for r in self.results for c in r.checks],
                "notices": self.notices}


# --- PostgreSQL ------------------------------------------------------------------------------

_TABLES = """SELECT n.nspname, c.relname, c.relkind FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
               AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'"""
_COLUMNS = """SELECT table_name, column_name, data_type || coalesce('(' || character_maximum_length || ')', ''),
                     is_nullable, coalesce(column_default, ''), is_identity
              FROM information_schema.columns WHERE table_schema = :s"""
_INDEXES = """SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :s"""
_CONSTRAINTS = """SELECT cl.relname, c.conname, c.contype, pg_get_constraintdef(c.oid)
                  FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid
                  JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE n.nspname = :s"""
_CROSS_FKS = """SELECT src_ns.nspname, src.relname, c.conname, dst_ns.nspname, dst.relname
                FROM pg_constraint c
                JOIN pg_class src ON src.oid = c.conrelid JOIN pg_namespace src_ns ON src_ns.oid = src.relnamespace
                JOIN pg_class dst ON dst.oid = c.confrelid JOIN pg_namespace dst_ns ON dst_ns.oid = dst.relnamespace
                WHERE c.contype = 'f' AND src_ns.nspname <> dst_ns.nspname
                  AND (src_ns.nspname = :s OR dst_ns.nspname = :s)"""


def _structure(conn: Any, schema: str, tables: frozenset[str]) -> dict[str, dict[str, tuple]]:
    """Columns, indexes and constraints of the given tables, with the schema name taken out."""
    import sqlalchemy as sa

    def unqualified(value: Any) -> Any:
        return value.replace(f"{schema}.", "").replace(f'"{schema}".', "") if isinstance(value, str) else value

    out: dict[str, dict[str, tuple]] = {t: {} for t in tables}
    for kind, query in (("column", _COLUMNS), ("index", _INDEXES), ("constraint", _CONSTRAINTS)):
        for row in conn.execute(sa.text(query), {"s": schema}):
            table, name, *rest = row
            if table in out:
                if kind == "index":
                    rest = [rest[0].replace(f" ON {schema}.", " ON ").replace(f' ON "{schema}".', " ON ")]
                out[table][f"{kind} {name}"] = tuple(unqualified(v) for v in rest)
    return out


def _structure_diff(public: dict[str, dict[str, tuple]], mine: dict[str, dict[str, tuple]],
                    schema: str) -> list[str]:
    problems = []
    for table in sorted(public.keys() & mine.keys()):
        theirs, ours = public[table], mine[table]
        for key in sorted(theirs.keys() | ours.keys()):
            if key not in ours:
                problems.append(f"{table}: {key} missing in {schema}")
            elif key not in theirs:
                problems.append(f"{table}: {key} only in {schema}")
            elif theirs[key] != ours[key]:
                problems.append(f"{table}: {key} differs ({' '.join(map(str, ours[key]))} in {schema}, "
                                f"{' '.join(map(str, theirs[key]))} in public)")
    return problems


def check_postgres(result: VerifyResult, env: Environment, target: Any, *,
                   script_location: Path | None = None) -> None:
    import sqlalchemy as sa

    from .stores import postgres
    from .tables import BOOKKEEPING_TABLES, isolated_tables, shared_tables, view_names

    store = "postgres"
    schema = env.schema
    isolated, shared, views = isolated_tables(), shared_tables(), view_names()
    with postgres.connect(target) as conn:
        rows = conn.execute(sa.text(_TABLES)).all()
        by_schema: dict[str, dict[str, str]] = {}
        for nsp, name, kind in rows:
            by_schema.setdefault(nsp, {})[name] = kind
        schemas = {r[0] for r in conn.execute(sa.text("SELECT nspname FROM pg_namespace"))}
        if schema not in schemas:
            result.add(store, f"schema {schema} exists", [f"schema {schema} does not exist; run migrate"])
            return
        mine = by_schema.get(schema, {})
        tables = {n for n, k in mine.items() if k in ("r", "p")} - BOOKKEEPING_TABLES
        plan = postgres.plan(target, script_location=script_location)
        result.add(store, f"{schema} at head",
                   [f"pending: {', '.join(s.name for s in plan.pending)}"] if plan.pending else [],
                   ok_detail=f"at {', '.join(plan.current) or 'base'}")
        result.add(store, f"{schema} holds every isolated table",
                   [f"isolated table {t} missing from {schema}" for t in sorted(isolated - tables)])
        if env.primary:
            result.add(store, "public holds every shared table and view",
                       [f"shared table {t} missing from public" for t in sorted(shared - tables)]
                       + [f"view {v} missing from public" for v in sorted(views - set(mine))])
            result.add(store, "no unexpected table in public",
                       [f"unexpected table {t} in public" for t in sorted(tables - isolated - shared)])
        else:
            result.add(store, f"{schema} holds only isolated tables",
                       [f"{'shared' if t in shared else 'unexpected'} table {t} exists in {schema}"
                        for t in sorted(tables - isolated)])
            in_public = {n for n, k in by_schema.get("public", {}).items() if k in ("r", "p")}
            common = frozenset(isolated & tables & in_public)
            name = f"{schema} tables have public's structure"
            if not common:
                result.add(store, name, status=NOT_CHECKABLE,
                           detail="public holds none of the isolated tables; migrate prod to compare")
            else:
                result.add(store, name, _structure_diff(_structure(conn, "public", common),
                                                        _structure(conn, schema, common), schema),
                           ok_detail=f"{len(common)} tables compared")
        outside = [(nsp, name, kind) for nsp, objs in by_schema.items() if nsp != "public"
                   for name, kind in objs.items() if kind in ("v", "m") or name in shared]
        result.add(store, "no shared table or view outside public",
                   [f"{'view' if kind in ('v', 'm') else 'shared table'} {nsp}.{name}" for nsp, name, kind in outside])
        cross = conn.execute(sa.text(_CROSS_FKS), {"s": schema}).all()
        result.add(store, f"foreign keys stay in {schema}",
                   [f"{a}.{b} -> {d}.{e} ({c})" for a, b, c, d, e in cross])


def check_privileges(result: VerifyResult, env: Environment, others: list[Environment], target: Any) -> None:
    """The environment's role, its members and their search_path: what each holds, and must not hold."""
    import sqlalchemy as sa

    from .stores import postgres
    from .stores.postgres import grants

    store = "postgres"
    if not env.pg_grants:
        result.add(store, f"role {env.pg_role} and its grants", status=NOT_CHECKABLE,
                   detail="MOMENTRY_PG_GRANTS=off: momentry-db does not manage roles and grants here")
        return
    with postgres.connect(target) as conn:
        exists = conn.execute(sa.text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": env.schema}).scalar()
    if not exists:
        return  # the schema check already failed, naming the migrate to run
    found = grants.inspect(target, [env, *others])
    result.add(store, f"role {env.pg_role} exists",
               [] if found.role_exists else [f"role {env.pg_role} does not exist, so grants were not managed; run "
                                             f"momentry-db migrate --env {env.name} with a login that has CREATEROLE"])
    if found.role_exists:
        for name, problems in grants.verify_problems(env, found).items():
            result.add(store, name, problems)


# --- MongoDB, Qdrant, Redis, directories -------------------------------------------------------


def _distinct(result: VerifyResult, store: str, label: str, env: Environment, others: list[Environment],
              value_of: Any) -> None:
    mine = value_of(env)
    result.add(store, f"{label} differs from other environments'",
               [f"{label} {mine!r} is also {o.name}'s" for o in others if value_of(o) == mine],
               ok_detail=str(mine))


def check_mongo(result: VerifyResult, env: Environment, others: list[Environment], target: Any,
                migrations: list[Any], primary: Any = None) -> None:
    """Database name, head, the shape recorded at the head, and (given ``primary``) the primary's shape."""
    from .stores import mongo

    _distinct(result, "mongo", "database", env, others, lambda e: e.mongo_database)
    if not target.configured:
        result.add("mongo", f"database {env.mongo_database} matches its migrations", status=NOT_CHECKABLE,
                   detail="MONGODB_URL is not set")
        return
    try:
        db = target.connect()
        exists = mongo.exists(db)
        result.add("mongo", f"database {env.mongo_database} exists",
                   [] if exists else [f"database {env.mongo_database} does not exist; run migrate"])
        if exists:
            plan = mongo.plan(target, migrations)
            result.add("mongo", f"database {env.mongo_database} matches its migrations",
                       [f"pending: {', '.join(s.name for s in plan.pending)}"] if plan.pending else [],
                       ok_detail=f"at {', '.join(plan.current) or 'none'}")
            if plan.current:
                _mongo_shape(result, env, db, plan.current[-1], migrations, primary)
        del db
        from .stores import mongo_users

        mongo_users.check(result, env, others)
    except Exception as exc:  # an unreachable server is a failed check, not a crash
        result.add("mongo", "server reachable", [scrub(str(exc), env.secrets())])
    finally:
        target.close()
        if primary is not None:
            primary.close()


def _mongo_shape(result: VerifyResult, env: Environment, db: Any, head: str, migrations: list[Any],
                 primary: Any) -> None:
    from .stores import mongo, mongo_shape

    name = f"database {env.mongo_database} has the shape recorded at its head"
    drift = mongo_shape.drift_from_record(db, head, mongo.BOOKKEEPING)
    if drift is None:
        result.add("mongo", name, status=NOT_CHECKABLE,
                   detail=f"no shape recorded at {head} (migrated before shapes were recorded); run "
                          f"momentry-db migrate --env {env.name} to record the live one as its baseline")
    else:
        result.add("mongo", name, drift, ok_detail=f"at {head}")
    if primary is None:
        return
    theirs = primary.env
    name = f"database {env.mongo_database} has {theirs.name}'s shape ({theirs.mongo_database})"
    if not primary.configured:
        result.add("mongo", name, status=NOT_CHECKABLE, detail=f"{theirs.name}'s MONGODB_URL is not set")
        return
    their_db = primary.connect()
    their_plan = mongo.plan(primary, migrations)
    if their_plan.current[-1:] != (head,):
        result.add("mongo", name, status=NOT_CHECKABLE,
                   detail=f"{theirs.name} is at {', '.join(their_plan.current) or 'none'}, {env.name} at {head}; "
                          f"migrate both to compare")
        return
    result.add("mongo", name, mongo_shape.compare(mongo_shape.live_shape(their_db, mongo.BOOKKEEPING),
                                                   mongo_shape.live_shape(db, mongo.BOOKKEEPING),
                                                   env.mongo_database, f"{theirs.name}'s {theirs.mongo_database}"),
               ok_detail=f"both at {head}")


def check_qdrant(result: VerifyResult, env: Environment, others: list[Environment], target: Any,
                 specs: list[Any]) -> None:
    from .stores import qdrant

    _distinct(result, "qdrant", "collection", env, others, lambda e: e.qdrant_collection)
    try:
        with target.session() as client:
            for spec in specs:
                alias = env.qdrant_collection_for(spec.name)
                cp = qdrant.plan_collection(client, target, spec)
                if cp.physical is None:
                    result.add("qdrant", f"collection {alias} exists", [f"{alias} does not exist; run migrate"])
                    continue
                result.add("qdrant", f"collection {alias} exists", ok_detail=f"-> {cp.physical}")
                same = [o.name for o in others
                        if qdrant.resolve(client, o.qdrant_collection_for(spec.name)) == cp.physical]
                result.add("qdrant", f"collection {alias} is not shared",
                           [f"{cp.physical} also serves {n}" for n in same])
                declared = [a for a in cp.actions if a.kind in ("recreate", "record")]
                result.add("qdrant", f"collection {alias} matches its spec",
                           [f"{a.kind}: {a.detail}" for a in declared],
                           ok_detail=f"fingerprint {spec.fingerprint()}")
                if target.local:
                    result.add("qdrant", f"{alias} hnsw, optimizers, payload indexes", status=NOT_CHECKABLE,
                               detail="local mode ignores them")
                else:
                    mutable = [a for a in cp.actions if a.kind not in ("recreate", "record")]
                    result.add("qdrant", f"{alias} hnsw, optimizers, payload indexes",
                               [f"{a.kind}: {a.detail}" for a in mutable])
    except Exception as exc:
        result.add("qdrant", "server reachable", [scrub(str(exc), env.secrets())])


def check_redis(result: VerifyResult, env: Environment, others: list[Environment]) -> None:
    problems = []
    for other in others:
        a, b = env.redis_prefix, other.redis_prefix
        if a == b:
            problems.append(f"prefix {a!r} is also {other.name}'s")
        elif a.startswith(b) or b.startswith(a):
            problems.append(f"prefix {a!r} and {other.name}'s {b!r} overlap (one is a prefix of the other)")
    result.add("redis", "prefix is distinct and not nested", problems, ok_detail=env.redis_prefix)
    if env.redis_url is None:
        result.add("redis", "keys under the prefix", status=NOT_CHECKABLE, detail="REDIS_URL is not set")
        return
    from .stores import redis as redis_store

    try:
        count = redis_store.count_keys(env.redis_url.reveal(), env.redis_prefix)
    except Exception as exc:
        result.add("redis", "keys under the prefix",
                   [f"cannot reach {env.redis_url.masked}: {scrub(str(exc), env.secrets())}"])
        return
    result.add("redis", "keys under the prefix", ok_detail=f"{count} keys under {env.redis_prefix}")
    from .stores import redis_acl

    redis_acl.check(result, env, others)


def check_directories(result: VerifyResult, env: Environment, others: list[Environment]) -> None:
    problems = []
    mine = {"output": env.output_dir, "backup": env.backup_dir}
    if _overlap(env.output_dir, env.backup_dir):
        problems.append(f"output {env.output_dir} and backup {env.backup_dir} overlap")
    for other in others:
        for kind, path in mine.items():
            for other_kind, other_path in (("output", other.output_dir), ("backup", other.backup_dir)):
                if path.resolve() == other_path.resolve():
                    problems.append(f"{kind} dir {path} is also {other.name}'s {other_kind} dir")
                elif _overlap(path, other_path):
                    problems.append(f"{kind} dir {path} and {other.name}'s {other_kind} dir {other_path} are nested")
    result.add("dirs", "output and backup dirs are distinct and not nested", problems,
               ok_detail=f"{env.output_dir}, {env.backup_dir}")


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)
