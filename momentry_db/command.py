"""One function per CLI verb. Each resolves settings once, then works through the stores.

These are plain functions: the CLI, tests and library users call them alike.
Progress is reported through ``emit(event, payload)``; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environments import Environment
from .errors import ConfigError
from .plan import Step, TargetOutcome
from .settings import Project
from .stores.base import Consent, shown_path

Emit = Callable[[str, Any], None]


def _ignore(event: str, payload: Any) -> None:
    pass


@dataclass(frozen=True)
class Sources:
    """Where each store's migrations come from; tests also inject fake clients here."""

    alembic_scripts: Path | None = None
    mongo_migrations: Path | None = None
    qdrant_specs: Path | None = None
    mongo_client: Any = None
    qdrant_client: Any = None


@dataclass
class RunResult:
    """What a migrate, plan or status run found and did: one outcome per store and environment."""

    command: str
    envs: list[str]
    targets: list[TargetOutcome] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    dry_run: bool = False
    parallel: int = 1

    @property
    def env(self) -> str:
        return ",".join(self.envs)

    @property
    def applied(self) -> list[Step]:
        """Every step this run applied, store by store, environment by environment."""
        return [s for t in self.targets for s in t.applied]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.targets)

    @property
    def states(self) -> tuple[str, ...]:
        first = "would apply" if self.dry_run else "pending" if self.command == "status" else "upgraded"
        return (first, "up to date", "failed", "refused")

    def summary(self) -> dict[str, int]:
        return {state: sum(1 for t in self.targets if t.outcome == state) for state in self.states}

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command, "envs": list(self.envs), "ok": self.ok, "dry_run": self.dry_run,
            "parallel": self.parallel, "summary": self.summary(),
            "targets": [t.to_json() for t in self.targets],
            "applied": [s.to_json() for s in self.applied],
            "skipped": self.skipped, "notices": self.notices,
        }


class _Run:
    """Shared plumbing of every command: notices (each said once) and skipped stores."""

    def __init__(self, result: Any, emit: Emit) -> None:
        self.result, self.emit = result, emit

    def notice(self, text: str) -> None:
        if text in self.result.notices:
            return
        self.result.notices.append(text)
        self.emit("notice", text)

    def skip(self, store: str, reason: str) -> None:
        self.result.skipped.append({"store": store, "reason": reason})
        self.notice(f"{store}: skipped ({reason})")


def _stores(selected: Sequence[str] | None, *, migrating: bool = True) -> list[Any]:
    from .stores.base import chosen

    return chosen(selected, migrating=migrating)


def _context(project: Project, sources: Sources, run: _Run, lock_timeout: float = 30.0) -> Any:
    from .stores.base import Context

    return Context(project, sources, run, lock_timeout)


def _load_declarations(stores: list[Any], ctx: Any) -> dict[str, Any]:
    """Read every store's declarations first, so a bad file stops the run before any write."""
    return {store.name: store.load(ctx) for store in stores}


def _refuse(question: str) -> bool:
    return False


def migrate(project: Project, env_names: str | Sequence[str] | None, *, stores: Sequence[str] | None = None,
            dry_run: bool = False, recreate_qdrant: bool = False, env_file: Path | None = None,
            overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
            sources: Sources = Sources(), lock_timeout: float = 30.0, consent: Consent = _refuse,
            keep_going: bool = False, parallel: int = 1) -> RunResult:
    """Plan and apply every pending step for one environment or several: postgres, then mongo, then qdrant.

    ``env_names`` is one name, several, or None for every configured environment (prod
    first). One environment is the one-element case of many: the same steps, the same
    result. Every target (each store of each environment) gets its own outcome. On prod,
    pending PostgreSQL revisions are linted first; risky DDL runs only when ``consent``
    agrees. A failure inside a store raises, unless ``keep_going``: then it becomes that
    target's outcome and the others still run (the CLI does this). A refusal stops a run
    over one environment before any write; over several, it is that target's outcome.
    """
    return _migration_run(project, "migrate", env_names, stores=stores, apply=not dry_run,
                          dry_run=dry_run, recreate_qdrant=recreate_qdrant, env_file=env_file,
                          overrides=overrides, emit=emit, sources=sources, lock_timeout=lock_timeout,
                          consent=consent, keep_going=keep_going, parallel=parallel)


def status(project: Project, env_names: str | Sequence[str] | None, *, stores: Sequence[str] | None = None,
           env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
           emit: Emit = _ignore, sources: Sources = Sources(), keep_going: bool = False) -> RunResult:
    """Report the current and pending steps of one environment or several, per store."""
    return _migration_run(project, "status", env_names, stores=stores, apply=False, dry_run=False,
                          env_file=env_file, overrides=overrides, emit=emit, sources=sources,
                          keep_going=keep_going)


def _environments(project: Project, env_names: str | Sequence[str] | None, env_file: Path | None,
                  overrides: Mapping[str, str | None] | None) -> tuple[list[Environment], bool]:
    """The environments a run covers, prod first, and whether they are several (or --all)."""
    if isinstance(env_names, str):
        env_names = [env_names]
    names = list(dict.fromkeys(env_names)) if env_names else list(project.registry.names)
    if env_names and len(names) == 1:
        return [project.environment(names[0], env_file=env_file, overrides=overrides)], False
    if env_file is not None or overrides:
        raise ConfigError("with several environments, use the environment and files for settings; "
                          "--env-file, --database-url and the --pg-* options take one --env")
    envs = sorted((project.environment(n, one_of_many=True) for n in names), key=lambda e: not e.primary)
    return envs, True


def _migration_run(project: Project, command: str, env_names: str | Sequence[str] | None, *,
                   stores: Sequence[str] | None, apply: bool, dry_run: bool, env_file: Path | None = None,
                   overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
                   sources: Sources = Sources(), recreate_qdrant: bool = False, lock_timeout: float = 30.0,
                   consent: Consent = _refuse, keep_going: bool = False, parallel: int = 1) -> RunResult:
    from .stores.base import MigrationWork

    if parallel < 1:
        raise ConfigError("--parallel must be 1 or more")
    envs, several = _environments(project, env_names, env_file, overrides)
    chosen = _stores(stores)
    result = RunResult(command, [e.name for e in envs], dry_run=dry_run, parallel=parallel)
    run = _Run(result, emit)
    work = MigrationWork(project, sources, run, lock_timeout, envs=envs, apply=apply, dry_run=dry_run,
                         keep_going=keep_going, consent=consent, recreate_qdrant=recreate_qdrant, parallel=parallel)
    work.declared = _load_declarations(chosen, work)
    if several:
        _note_ignored_isolation_vars(project, run)
    parts = [store.migration(work) for store in chosen]
    for part in parts:  # every refusal, in any store, before the first write
        part.preflight()
    for part in parts:
        result.targets.extend(part.run())
    return result


def stop_embedded(project: Project) -> ActionResult:
    """Stop this project's embedded servers (PostgreSQL and MongoDB) that run."""
    from .stores import embedded_mongo
    from .stores.embedded import stop_embedded as stop_postgres

    outcomes = {"postgres": "stopped" if stop_postgres(project.state_dir) else "not running",
                "mongo": embedded_mongo.stop(project.state_dir)}
    said = {"stopped": "embedded server stopped", "not running": "embedded server is not running",
            "stale": "embedded server was not running; its stale record was cleared"}
    return ActionResult("embedded stop", "*", lines=[f"{store}: {said[o]}" for store, o in outcomes.items()],
                        data={"stopped": [s for s, o in outcomes.items() if o == "stopped"], "servers": outcomes})


def embedded_status(project: Project) -> ActionResult:
    """List this project's embedded servers: address, data directory, pid and state."""
    from .stores import embedded_mongo
    from .stores.embedded import embedded_status as postgres_status

    rows = [postgres_status(project.state_dir), embedded_mongo.status(project.state_dir)]
    lines = [f"{row['server']:<9} {row['state']:<8} {row['address'] or '-'}  pid {row['pid'] or '-'}  "
             f"data {shown_path(Path(str(row['data_dir'])))}" + (f"  ({row['detail']})" if row["detail"] else "")
             for row in rows]
    if not project.embedded:
        lines.append("MOMENTRY_EMBEDDED=off: commands do not start these servers")
    return ActionResult("embedded status", "*", lines=lines, data={"servers": rows, "enabled": project.embedded})


def verify(project: Project, env_names: str | Sequence[str] | None, *, stores: Sequence[str] | None = None,
           env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
           emit: Emit = _ignore, sources: Sources = Sources()) -> Any:
    """Prove the isolation of one environment, several, or every one (None), from every other."""
    from . import verify as checks

    envs, several = _environments(project, env_names, env_file, overrides)
    if not several:
        return _verify_one(project, envs[0], stores=stores, emit=emit, sources=sources)
    many = checks.VerifyMany("verify", [])
    for env in envs:
        one = _verify_one(project, env, stores=stores, emit=emit, sources=sources)
        many.results.append(one)
        many.notices += [n for n in one.notices if n not in many.notices]
    return many


def _verify_one(project: Project, env: Environment, *, stores: Sequence[str] | None, emit: Emit,
                sources: Sources) -> Any:
    """Prove one environment's isolation from every other, store by store."""
    from . import verify as checks
    from .stores.base import NAMES

    others = [project.environment(name, one_of_many=True) for name in project.registry.names if name != env.name]
    checkable = (*NAMES, "dirs")
    unknown = [s for s in stores or () if s not in checkable]
    if unknown:
        raise ConfigError(f"unknown store {unknown[0]!r}; verify knows: {', '.join(checkable)}")
    picked = [s for s in checkable if not stores or s in stores]
    result = checks.VerifyResult("verify", env.name)
    ctx = _context(project, sources, _Run(result, emit))
    in_stores = [s for s in picked if s in NAMES]
    chosen = _stores(in_stores, migrating=False) if in_stores else []
    declared = _load_declarations(chosen, ctx)
    for store in chosen:
        store.verify(ctx, result, env, others, declared[store.name])
    if "dirs" in picked:
        checks.check_directories(result, env, others)
    for check in result.checks:
        emit("check", check)
    return result


@dataclass
class ActionResult:
    """What a management command (reset, clone, adopt, env-file, envs) did, for the report."""

    command: str
    env: str
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "env": self.env, "ok": self.ok, **self.data,
                "skipped": self.skipped, "notices": self.notices}


def grant(project: Project, env_name: str, *, login: str | None, revoke: bool = False, store: str = "postgres",
          admin_url: str | None = None, env_file: Path | None = None,
          overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
          sources: Sources = Sources()) -> ActionResult:
    """Limit a login to one environment; revoke undoes it.

    PostgreSQL: put an existing login into the environment's role, with its search_path.
    Redis and MongoDB: set up the user named in REDIS_URL / MONGODB_URL, connecting with an
    administrative URL. Every refusal, a malformed name first, comes before anything is written.
    """
    granters = {"postgres": _grant_postgres, "redis": _grant_user("redis", "redis_acl", "REDIS_URL"),
                "mongo": _grant_user("mongo", "mongo_users", "MONGODB_URL")}
    if store not in granters:
        raise ConfigError(f"grant knows --store {', '.join(granters)}, not {store!r}")
    if admin_url is not None and store == "postgres":
        raise ConfigError("--admin-url is for --store redis or mongo; PostgreSQL grants connect with DATABASE_URL")
    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    result = ActionResult("grant", env.name)
    granters[store](project, env, login, revoke, _context(project, sources, _Run(result, emit)), result,
                    admin_url)
    return result


def _grant_user(name: str, module: str, variable: str) -> Callable[..., None]:
    """grant for a store whose user, and its password, come from the environment's ``variable``."""
    def grant_user(project: Project, env: Environment, login: str | None, revoke: bool, ctx: Any,
                   result: ActionResult, admin_url: str | None) -> None:
        import importlib

        store = importlib.import_module(f"momentry_db.stores.{module}")
        url = getattr(env, variable.lower())
        user = store.login(url.reveal()).user if url is not None else None
        if login is not None and login != user:
            raise ConfigError(f"grant --store {name} sets up the user named in {env.name}'s {variable}; "
                              "drop --login")
        changed = store.grant(env, project.admin_url(name, admin_url), revoke=revoke)
        result.lines += changed
        result.data = {"store": name, "user": user, "revoke": revoke, "changed": changed}
    return grant_user


def _grant_postgres(project: Project, env: Environment, login: str | None, revoke: bool, ctx: Any,
                    result: ActionResult, admin_url: str | None = None) -> None:
    from .environments import validate_role
    from .stores import postgres_store
    from .stores.postgres import grants

    if login is None:
        raise ConfigError("grant --store postgres needs --login NAME, the login the service connects with")
    validate_role(login, "login")
    if not env.pg_grants:
        raise ConfigError(f"MOMENTRY_PG_GRANTS=off: momentry-db does not manage {env.name}'s role and grants; "
                          "unset it to use grant")
    everyone = [env, *(e for e in project.environments() if e.name != env.name)]
    done = grants.grant_login(postgres_store.target(ctx, env), login, everyone, revoke=revoke)
    where = f"postgres {env.name}: login {login}"
    if done.changed:
        result.lines.append(f"{where}: {'; '.join(done.changed)}")
    elif revoke:
        result.lines.append(f"{where}: not in role {done.role}; nothing changed")
    else:
        result.lines.append(f"{where}: already in role {done.role} with search_path {done.search_path}; "
                            "nothing changed")
    result.data = done.to_json()


def resettable(project: Project, env_name: str) -> Environment:
    """Resolve an environment that may be reset; prod is refused whatever the flags."""
    from .errors import RefusedError

    env = project.environment(env_name)
    if env.primary:
        raise RefusedError("reset is refused for prod, whatever the flags: it would destroy production data")
    return env


def _reset_drops(env: Environment, stores: list[Any], ctx: Any, declared: dict[str, Any],
                 closing: Any) -> list[Any]:
    """What a reset of ``env`` removes, store by store, in the order it removes them."""
    return [d for d in (store.drop(ctx, env, declared[store.name], closing) for store in stores) if d is not None]


def _preflight(env: Environment, drops: list[Any]) -> None:
    """Check every store a reset will touch before touching any; refuse with every problem found."""
    from .environments import scrub
    from .errors import MomentryError, RefusedError

    problems = []
    for d in drops:
        try:
            d.check()
        except MomentryError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a driver error is a problem of that store
            reason = (str(exc).strip().splitlines() or [""])[0]
            problems.append(scrub(f"{d.store} {d.label}: {type(exc).__name__}: {reason}", env.secrets()))
    if problems:
        raise RefusedError(f"reset {env.name} refused: {'; '.join(problems)}; nothing was dropped, "
                           f"fix {'this' if len(problems) == 1 else 'these'} and run reset again")


def _drop_all(env: Environment, drops: list[Any]) -> dict[str, Any]:
    """Drop store by store; a failure names what was already dropped and what was not."""
    from .environments import scrub
    from .errors import MomentryError, StoreError

    dropped: dict[str, Any] = {}
    for i, d in enumerate(drops):
        try:
            dropped[d.store] = d.drop()
        except Exception as exc:
            if isinstance(exc, MomentryError):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            done = ", ".join(f"{x.store} {x.what}" for x in drops[:i]) or "nothing"
            left = ", ".join(f"{x.store} {x.what}" for x in drops[i:])
            raise StoreError(d.store, d.label, "drop", scrub(
                f"{reason}; already dropped: {done}; not dropped: {left}; fix the cause and run reset "
                f"--env {env.name} again", env.secrets())) from None
    return dropped


def reset(project: Project, env_name: str, *, stores: Sequence[str] | None = None, emit: Emit = _ignore,
          sources: Sources = Sources()) -> ActionResult:
    """Drop and recreate one environment's schema, database, collection and Redis keys, then migrate.

    Every store is checked first (reachable, permitted, its lock free, nothing outside
    the environment reached); any problem refuses the reset before anything is dropped.
    """
    from contextlib import ExitStack

    env = resettable(project, env_name)
    # A selection names stores that keep migrations (they are migrated afterwards); with none,
    # every store is emptied, Redis keys included.
    chosen = _stores(stores, migrating=bool(stores))
    result = ActionResult("reset", env.name)
    ctx = _context(project, sources, _Run(result, emit))
    declared = _load_declarations(chosen, ctx)  # check every declaration before dropping anything
    with ExitStack() as closing:
        drops = _reset_drops(env, chosen, ctx, declared, closing)
        _preflight(env, drops)
        dropped = _drop_all(env, drops)
    result.lines += [d.line(env.name, dropped[d.store]) for d in drops]
    migrated = migrate(project, env.name, stores=stores, emit=emit, sources=sources)
    result.data = {"dropped": dropped, "migrated": migrated.to_json()}
    result.lines.append(f"migrated {env.name}: {len(migrated.applied)} step(s) applied")
    return result


def prune(project: Project, env_name: str, *, yes: bool = False, confirm: Consent = _refuse,
          emit: Emit = _ignore, sources: Sources = Sources()) -> ActionResult:
    """List the Qdrant collections an environment's aliases no longer point at; with yes, delete them.

    Each is listed with its point count. Deleting prod's also needs ``confirm`` (the CLI
    asks for the environment's name to be typed, or takes --confirm prod).
    """
    from .errors import RefusedError
    from .stores import qdrant, qdrant_store
    from .stores.base import store

    env = project.environment(env_name)
    result = ActionResult("prune", env.name)
    ctx = _context(project, sources, _Run(result, emit))
    specs = store("qdrant").load(ctx)
    target = qdrant_store.announced(ctx, env)
    deleted: list[str] = []
    changed: list[str] = []
    with target.session() as client:
        target = target.bound(client)
        live, old = qdrant.old_collections(client, env, specs)
        points = sum(o.points for o in old)
        if old and yes:
            if env.primary and not confirm(f"prune deletes {len(old)} old Qdrant collection(s) of prod holding "
                                           f"{points} point(s): {', '.join(o.name for o in old)}"):
                raise RefusedError("prune of prod needs a typed confirmation: type 'prod' when asked on a "
                                   "terminal, or pass --confirm prod; nothing was deleted")
            deleted, changed = qdrant.prune(client, target, old)
    for alias, physical in live.items():
        result.lines.append(f"qdrant {env.name}: {alias} -> {physical}: live, kept" if physical else
                            f"qdrant {env.name}: {alias} is missing: its collections are left alone; run "
                            f"momentry-db migrate --env {env.name} first")
    for o in old:
        state = ("deleted" if o.name in deleted else "left: it changed since it was listed" if o.name in changed
                 else "old")
        result.lines.append(f"qdrant {env.name}: {o.name}: {o.vectors}, {o.points} points"
                            + (", an interrupted copy" if o.interrupted else "") + f": {state}")
    if not old:
        result.lines.append(f"prune {env.name}: no old collections; nothing to delete")
    elif not yes:
        result.lines.append(f"prune {env.name}: {len(old)} old collection(s) holding {points} point(s); nothing "
                            f"deleted (rerun with --yes to delete them)")
    else:
        result.lines.append(f"prune {env.name}: {len(deleted)} old collection(s) deleted"
                            + (f", {len(changed)} left because they changed; run prune again" if changed else ""))
    result.data = {"live": live, "collections": [o.to_json() for o in old], "deleted": deleted,
                   "changed": changed}
    return result


def clone(project: Project, source_name: str, dest_name: str, *, stores: Sequence[str] | None = None,
          tables: Sequence[str] | None = None, limit: int | None = None, emit: Emit = _ignore,
          sources: Sources = Sources()) -> ActionResult:
    """Copy one environment's data into another (never into prod)."""
    from .errors import RefusedError
    from .tables import isolated_tables

    source = project.environment(source_name, one_of_many=True)  # process-wide names describe --to only
    dest = project.environment(dest_name)
    if source.name == dest.name:
        raise ConfigError(f"--from and --to both name {source.name}; clone needs two environments")
    if dest.primary:
        raise RefusedError("clone never writes into prod; choose another --to")
    if limit is not None and limit < 0:
        raise ConfigError("--limit must be zero or more")
    if tables is not None and not tables:
        raise ConfigError("--tables names no table; leave it out to copy every isolated table")
    selected = list(tables) if tables else sorted(isolated_tables())
    unknown = sorted(set(selected) - isolated_tables())
    if unknown:
        raise ConfigError(f"unknown or shared table(s): {', '.join(unknown)}; clone copies isolated tables: "
                          f"{', '.join(sorted(isolated_tables()))}")
    _refuse_orphaning(selected)
    chosen = _stores(stores)
    result = ActionResult("clone", dest.name)
    ctx = _context(project, sources, _Run(result, emit))
    declared = _load_declarations(chosen, ctx)
    for store in chosen:  # what a store cannot copy is refused before any store writes
        store.clone_check(ctx, source, dest)
    copied: dict[str, dict[str, int]] = {}
    for store in chosen:
        counts = store.clone(ctx, source, dest, declared[store.name], selected, limit)
        if counts is not None:
            copied[store.name] = counts
    for store, counts in copied.items():
        for name, count in counts.items():
            result.lines.append(f"{store} {source.name} -> {dest.name}: {name}: {count} copied")
    result.data = {"from": source.name, "to": dest.name, "copied": copied}
    return result


def _refuse_orphaning(selected: Sequence[str]) -> None:
    """clone empties the tables it fills; a table that references one of them must come along."""
    from .models import metadata

    chosen = set(selected)
    missing = sorted({t.name for t in metadata.sorted_tables if t.name not in chosen
                      for fk in t.foreign_key_constraints if fk.referred_table.name in chosen})
    if missing:
        raise ConfigError(f"{', '.join(missing)} reference(s) the tables being copied, which clone empties "
                          f"first; add {', '.join(missing)} to --tables")


def adopt(project: Project, env_name: str, *, force: bool = False, emit: Emit = _ignore,
          sources: Sources = Sources()) -> ActionResult:
    """Take over a schema created outside Alembic: compare it with the models, then stamp it."""
    from .stores import postgres, postgres_store

    env = project.environment(env_name)
    result = ActionResult("adopt", env.name)
    ctx = _context(project, sources, _Run(result, emit))
    target = postgres_store.target(ctx, env)
    plan = postgres.plan(target, script_location=ctx.scripts)
    if plan.current:
        result.lines.append(f"postgres {env.name} (schema {env.schema}): already managed, at {', '.join(plan.current)}")
        result.data = {"stamped": False, "current": list(plan.current), "differences": []}
        return result
    differences = postgres.compare_live(target)
    result.data = {"differences": differences, "stamped": False}
    result.lines += [f"postgres {env.name} (schema {env.schema}): {d}" for d in differences]
    if differences and not force:
        result.ok = False
        result.lines.append(f"not stamped: {len(differences)} difference(s) from the models; fix them, "
                            "or stamp anyway with --force")
        return result
    postgres.stamp(target, script_location=ctx.scripts, project=project)
    result.data["stamped"] = True
    result.data["current"] = list(plan.head)
    result.lines.append(f"postgres {env.name} (schema {env.schema}): stamped at {', '.join(plan.head)}"
                        + (" despite the differences (--force)" if differences else ""))
    return result


ISOLATION_KEYS = ("DATABASE_SCHEMA", "MONGODB_DATABASE", "QDRANT_COLLECTION", "MOMENTRY_REDIS_PREFIX",
                  "MOMENTRY_OUTPUT_DIR", "MOMENTRY_BACKUP_DIR", "MOMENTRY_SERVER_PORT", "MOMENTRY_WORKER_ENABLED")


def isolation_values(env: Environment) -> dict[str, str]:
    """The variables that point a Momentry binary at one environment's targets."""
    values = {
        "DATABASE_SCHEMA": env.schema, "MONGODB_DATABASE": env.mongo_database,
        "QDRANT_COLLECTION": env.qdrant_collection, "MOMENTRY_REDIS_PREFIX": env.redis_prefix,
        "MOMENTRY_OUTPUT_DIR": str(env.output_dir), "MOMENTRY_BACKUP_DIR": str(env.backup_dir),
        "MOMENTRY_WORKER_ENABLED": "true" if env.worker_enabled else "false",
    }
    if env.server_port is not None:
        values["MOMENTRY_SERVER_PORT"] = str(env.server_port)
    return values


def env_file(project: Project, env_name: str, *, check: bool = False, path: Path | None = None) -> ActionResult:
    """Write (or with check, compare) an environment's isolation variables in its env file."""
    from dotenv import set_key

    from .settings import read_env_file, refuse_foreign_env_file

    if path is not None:
        refuse_foreign_env_file(project, project.registry.get(env_name), path, "--path")
    env = project.environment(env_name, env_file=path if path and path.is_file() else None)
    target = path or project.root / project.registry.get(env.name).default_env_file()
    current = read_env_file(target) if target.is_file() else {}
    wanted = isolation_values(env)
    changes = [(k, current.get(k), v) for k, v in wanted.items() if current.get(k) != v]
    result = ActionResult("env-file", env.name, data={
        "path": str(target), "check": check, "in_sync": not changes,
        "changes": [{"key": k, "old": old, "new": new} for k, old, new in changes]})
    for key, old, new in changes:
        result.lines.append(f"{target.name}: {key}: {old if old is not None else '(missing)'} -> {new}")
    if check:
        result.ok = not changes
        result.lines.append(f"{target.name}: {'in sync' if not changes else f'{len(changes)} difference(s)'}")
        return result
    if changes:
        target.touch(exist_ok=True)
        for key, _, new in changes:
            set_key(str(target), key, new, quote_mode="never")
    result.lines.append(f"{target.name}: {len(changes)} variable(s) written" if changes else f"{target.name}: already in sync")
    return result


def envs(project: Project, emit: Emit = _ignore) -> ActionResult:
    """List every environment and its targets, secrets masked."""
    rows = []
    for env in project.environments():
        rows.append({
            "name": env.name, "primary": env.primary, "schema": env.schema,
            "mongodb_database": env.mongo_database, "qdrant_collection": env.qdrant_collection,
            "redis_prefix": env.redis_prefix, "output_dir": str(env.output_dir),
            "backup_dir": str(env.backup_dir), "server_port": env.server_port,
            "worker_enabled": env.worker_enabled,
            "env_file": str(env.env_file) if env.env_file else None,
            "database_url": env.database_url.masked if env.database_url else None,
            "mongodb_url": env.mongodb_url.masked if env.mongodb_url else None,
            "qdrant_url": env.qdrant_url.masked if env.qdrant_url else None,
            "qdrant_api_key": "***" if env.qdrant_api_key else None,
            "redis_url": env.redis_url.masked if env.redis_url else None,
        })
    result = ActionResult("envs", "*", data={"environments": rows})
    _note_ignored_isolation_vars(project, _Run(result, emit))  # type: ignore[arg-type]
    for row in rows:
        result.lines.append(
            f"{row['name']:<10} schema {row['schema']:<12} mongo {row['mongodb_database']:<18} "
            f"qdrant {row['qdrant_collection']:<22} redis {row['redis_prefix']:<16} "
            f"output {row['output_dir']}  backup {row['backup_dir']}"
            + (f"  port {row['server_port']}" if row['server_port'] else "")
            + (f"  db {row['database_url']}" if row['database_url'] else ""))
    return result


def token(project: Project, env_name: str, *, expires_in: str | None = None, emit: Emit = _ignore,
          sources: Sources = Sources()) -> ActionResult:
    """A Qdrant JWT granting read-write on the environment's collections only (signed with QDRANT_API_KEY)."""
    from datetime import datetime, timezone

    from .stores import qdrant_token
    from .stores.base import store

    env = project.environment(env_name)
    seconds = qdrant_token.parse_duration(expires_in) if expires_in is not None else None
    result = ActionResult("token", env.name)
    qdrant = store("qdrant")
    specs = qdrant.load(_context(project, sources, _Run(result, emit)))
    signed, claims = qdrant_token.token(env, specs, expires_in=seconds)
    expires = claims.get("exp")
    if expires is None:
        result.notices.append(f"qdrant: the token for {env.name} does not expire; it is revoked only by changing "
                              "the server's API key (give --expires-in to bound it)")
        emit("notice", result.notices[-1])
    result.lines.append(signed)  # the result itself, on stdout; never in a notice or a log
    result.data = {"token": signed, "access": claims["access"], "expires_at":
                   datetime.fromtimestamp(expires, timezone.utc).isoformat() if expires is not None else None}
    return result


def check(project: Project, env_names: str | Sequence[str] | None, *, stores: Sequence[str] | None = None,
          env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
          emit: Emit = _ignore, sources: Sources = Sources()) -> ActionResult:
    """Exit 0 only when every store of every environment is at head and matches what it declares."""
    from .stores.base import KIND, store

    envs, several = _environments(project, env_names, env_file, overrides)
    st = status(project, env_names, stores=stores, env_file=env_file, overrides=overrides, emit=emit,
                sources=sources)
    result = ActionResult("check", st.env, notices=st.notices, skipped=st.skipped)
    ctx = _context(project, sources, _Run(result, emit))
    by_name = {e.name: e for e in envs}
    pending = [s for t in st.targets for s in t.pending]
    drift: list[str] = []
    failed = {s.env for s in pending}
    for target in st.targets:
        found = store(target.store).drift(ctx, by_name[target.env], target.plan)
        failed |= {target.env} if found else set()
        if found is None:
            ctx.run.notice(f"{target.store}: drift is compared once the {KIND[target.store]} is at head; "
                           "migrate, then check again")
        else:
            drift += found
    result.ok = not pending and not drift
    result.lines += [f"pending: {s.store} {s.env} ({s.target}): {s.name} {s.description}".rstrip() for s in pending]
    result.lines += [f"drift: {d}" for d in drift[:20]] + ([f"drift: and {len(drift) - 20} more"] if len(drift) > 20 else [])
    result.lines.append(f"check {st.env}: " + ("every store at head, no drift" if result.ok else
                                                 f"{len(pending)} pending step(s), {len(drift)} drift(s)"))
    names = [e.name for e in envs if e.name in failed]
    if several and names:
        result.lines.append(f"check: {len(names)} of {len(envs)} environment(s) failed: {', '.join(names)}")
    result.data = {"envs": [e.name for e in envs], "failed": names, "pending": [s.to_json() for s in pending],
                   "drift": drift, "targets": [t.to_json() for t in st.targets]}
    return result


def lint(project: Project, env_names: str | Sequence[str] | None, *, env_file: Path | None = None,
         overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
         sources: Sources = Sources()) -> ActionResult:
    """Lint the SQL of the pending PostgreSQL revisions of one environment or several (squawk)."""
    from .lint import lint_sql
    from .stores import postgres, postgres_store

    envs, several = _environments(project, env_names, env_file, overrides)
    result = ActionResult("lint", ",".join(e.name for e in envs))
    ctx = _context(project, sources, _Run(result, emit))
    pending: list[Step] = []
    findings: list[Any] = []
    failed: list[str] = []
    for env in envs:
        plan = postgres.plan(postgres_store.target(ctx, env), with_sql=True, script_location=ctx.scripts,
                             project=project)
        found = lint_sql(plan.sql, f"postgres {env.name} (schema {env.schema})") if plan.sql else []
        result.lines += [str(f) for f in found]
        result.lines.append(f"lint {env.name}: {len(plan.pending)} pending revision(s), "
                            f"{len(found)} risky statement(s)")
        pending += plan.pending
        findings += found
        failed += [env.name] if found else []
    if several and failed:
        result.lines.append(f"lint: {len(failed)} of {len(envs)} environment(s) with risky statements: "
                            f"{', '.join(failed)}")
    result.ok = not findings
    result.data = {"envs": [e.name for e in envs], "failed": failed, "pending": [s.to_json() for s in pending],
                   "findings": [f.to_json() for f in findings]}
    return result


def downgrade(project: Project, env_name: str, revision: str, *, consent: Consent = _refuse,
              emit: Emit = _ignore, sources: Sources = Sources(), lock_timeout: float = 30.0) -> ActionResult:
    """Downgrade one environment's schema to a revision.

    Prod always needs explicit consent; another environment needs it when any of its
    tables holds rows, since a downgrade may drop them.
    """
    from .errors import RefusedError
    from .stores import postgres, postgres_store

    env = project.environment(env_name)
    _known_revision(revision, sources.alembic_scripts or project.alembic_scripts)
    if env.primary and not consent(f"downgrade prod (schema {env.schema}) to {revision}"):
        raise RefusedError("downgrade of prod needs explicit consent: confirm on a terminal, or pass --yes")
    result = ActionResult("downgrade", env.name)
    ctx = _context(project, sources, _Run(result, emit), lock_timeout)
    target = postgres_store.target(ctx, env)
    populated = [] if env.primary else postgres.tables_with_rows(target)
    if populated and not consent(f"downgrade {env.name} (schema {env.schema}) to {revision}; tables holding rows "
                                 f"may be dropped: {', '.join(populated)}"):
        raise RefusedError(f"downgrade of {env.name} (schema {env.schema}) may drop tables holding rows "
                           f"({', '.join(populated[:5])}{', ...' if len(populated) > 5 else ''}); confirm on a "
                           "terminal, or pass --yes; nothing was changed")
    undone = postgres.downgrade(target, revision, script_location=ctx.scripts, project=project)
    result.lines += [f"postgres {env.name} (schema {env.schema}): downgraded {r}" for r in undone]
    result.lines.append(f"downgraded {env.name} to {revision}: {len(undone)} revision(s) undone")
    result.data = {"undone": undone, "to": revision}
    return result


def _known_revision(revision: str, scripts: Path | None) -> None:
    """A downgrade target must be base or a revision of this checkout."""
    from .stores import postgres

    if revision == "base":
        return
    if revision in ("head", "heads"):
        raise ConfigError("downgrade --to head goes nowhere; name a revision below the current one, or base")
    if not postgres.has_revision(scripts, revision):
        raise ConfigError(f"unknown revision {revision!r}; use base or one of the revisions in migrations/versions")


def history(project: Project, env_names: str | Sequence[str] | None, *, limit: int = 50,
            stores: Sequence[str] | None = None, emit: Emit = _ignore, sources: Sources = Sources()) -> ActionResult:
    """Show the steps applied to one environment or several: time, store, step, duration and outcome."""
    envs, several = _environments(project, env_names, None, None)
    chosen = _stores(stores)
    result = ActionResult("history", ",".join(e.name for e in envs))
    ctx = _context(project, sources, _Run(result, emit))
    declared = _load_declarations(chosen, ctx)
    entries: list[dict[str, Any]] = []
    for env in envs:
        for store in chosen:
            entries.extend(store.history(ctx, env, declared[store.name], limit))
    entries.sort(key=lambda e: str(e.get("recorded_at", "")), reverse=True)
    entries = entries[:limit]
    for e in entries:
        ms = e.get("duration_ms")
        result.lines.append(f"{e.get('recorded_at')}  " + (f"{e.get('env')}  " if several else "")
                            + f"{e.get('store'):<8} {e.get('step')}  "
                            f"{e.get('outcome')}" + (f" in {ms} ms" if ms is not None else "")
                            + (f": {e['error']}" if e.get("error") else ""))
    if not entries:
        result.lines.append(f"no history recorded for {result.env}")
    result.data = {"envs": [e.name for e in envs], "history": entries}
    return result


def _note_ignored_isolation_vars(project: Project, run: _Run) -> None:
    names = project.process_isolation_vars()
    if names:
        run.notice(f"{', '.join(names)} in the process environment name(s) one environment's targets; "
                   "ignored when listing or migrating several (set them in each env file instead)")


def unlock(project: Project, env_name: str, store: str, *, yes: bool = False, emit: Emit = _ignore,
           sources: Sources = Sources()) -> ActionResult:
    """Show who holds one store's migration lock for an environment; with ``yes``, release it.

    Without ``yes`` the holder is named in the refusal and nothing changes. A lock that
    momentry-db may not release (a foreign PostgreSQL session, a local file lock) is
    refused either way, with what to do instead.
    """
    from .errors import RefusedError

    env = project.environment(env_name)
    known = [s.name for s in _stores(None)]
    if store not in known:
        raise ConfigError(f"unknown store {store!r}; unlock knows: {', '.join(known)}")
    (chosen,) = _stores([store])
    result = ActionResult("unlock", env.name)
    ctx = _context(project, sources, _Run(result, emit))
    declared = _load_declarations([chosen], ctx)
    with chosen.lock_target(ctx, env, declared[store]) as (module, target, extra):
        locks = module.held_locks(target, *extra)
        if not locks:
            result.lines.append(f"{store} {env.name}: no migration lock held")
            result.data = {"store": store, "locks": [], "released": []}
            return result
        for lock in locks:
            if not lock.releasable:
                raise RefusedError(f"{lock}; {lock.why_not}")
        if not yes:
            raise RefusedError("; ".join(str(lock) for lock in locks) + ". Release it only if that run is "
                               f"gone: momentry-db unlock --env {env.name} --store {store} --yes")
        released = [lock for lock in locks if module.release_lock(target, lock)]
        for lock in locks:
            result.lines.append(f"{lock.store} {lock.target}: " + (
                f"released the migration lock held by {lock.holder}" if lock in released
                else "the lock changed hands before it was released; nothing was changed, run unlock again"))
        result.ok = len(released) == len(locks)
        result.data = {"store": store, "locks": [lock.to_json() for lock in locks],
                       "released": [lock.to_json() for lock in released]}
    return result
