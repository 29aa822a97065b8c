"""One function per CLI verb. Each resolves settings once, then works through the stores.

These are plain functions: the CLI, tests and library users call them alike.
Progress is reported through ``emit(event, payload)``; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environments import Environment
from .errors import ConfigError
from .plan import Step, TargetOutcome, TargetPlan, unplanned
from .settings import Project

STORES = ("postgres", "mongo", "qdrant")
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


def _stores(selected: Sequence[str] | None) -> list[str]:
    chosen = list(selected) if selected else list(STORES)
    for store in chosen:
        if store not in STORES:
            raise ConfigError(f"unknown store {store!r}; known: {', '.join(STORES)}")
    return [s for s in STORES if s in chosen]  # always postgres, then mongo, then qdrant


def _scripts(project: Project, sources: Sources) -> Path | None:
    """Where the Alembic revisions are: given by the caller, the project's alembic.ini, or the package's."""
    return sources.alembic_scripts or project.alembic_scripts


def _refuse_unmanaged(env: Environment, plan: TargetPlan) -> None:
    """Never create what a schema built outside momentry-db already holds: that is adopt's job."""
    from .errors import RefusedError
    from .stores import postgres

    if plan.pending and any(n.startswith(postgres.UNMANAGED) for n in plan.notes):
        raise RefusedError(f"postgres {env.name} (schema {env.schema}) already holds "
                           f"{plan.notes[0].split(': ', 1)[1]} but no alembic_version; run "
                           f"momentry-db adopt --env {env.name} instead of creating them again")


def _consent_to_risks(target: Any, plan: TargetPlan, consent: Consent, scripts: Path | None) -> None:
    """Lint prod's pending SQL; risky statements need explicit consent."""
    from .errors import RefusedError
    from .lint import lint_sql
    from .stores import postgres

    env = target.env
    if not plan.pending or (not plan.current and not plan.notes):
        return  # nothing pending, or none of our tables yet: no data to lock, no client to break
    sql = plan.sql or postgres.offline_sql(target, f"{plan.current[0]}:head" if plan.current else "head",
                                           script_location=scripts)
    findings = lint_sql(sql, f"postgres {env.name} (schema {env.schema})")
    if not findings:
        return
    summary = "; ".join(str(f) for f in findings[:5]) + (f"; and {len(findings) - 5} more" if len(findings) > 5 else "")
    if not consent(f"{len(findings)} risky statement(s) in the pending revisions for {env.name}: {summary}"):
        raise RefusedError(f"{env.name}: lint found {len(findings)} risky statement(s) in the pending revisions "
                           f"({findings[0]}); review them with momentry-db lint --env {env.name}, then rerun "
                           "with --accept-risky")


def _postgres_target(env: Environment, run: _Run) -> Any:
    from .stores import postgres

    target = postgres.PgTarget(env, emit=run.emit)
    target.url()
    if target.embedded:
        run.notice(f"postgres: DATABASE_URL is not set; using the embedded server in "
                   f"{_shown_path(env.state_dir / 'pg')} (database momentry)")
    return target


@contextmanager
def _mongo(env: Environment, run: _Run, sources: Sources, target: Any = None) -> Iterator[Any]:
    """The environment's MongoDB target, closed afterwards; None (with a notice) when not configured."""
    from .stores import mongo

    target = target or mongo.MongoTarget(env, client=sources.mongo_client)
    if not target.configured:
        run.skip("mongo", "MONGODB_URL is not set")
        yield None
        return
    try:
        _embedded_mongo(target, run)
        yield target
    finally:
        target.close()


def _embedded_mongo(target: Any, run: _Run) -> None:
    """Start (or reuse) the embedded MongoDB server when ``target`` uses it, and say so (once per target)."""
    if target.server is not None:
        return
    server = target.embedded_server()
    if server is None:
        return
    where = _shown_path(server.home)
    if server.replaced:
        run.notice(f"mongo: the embedded server in {where} was stale ({server.replaced}); started a new one")
    run.notice(f"mongo: MONGODB_URL is not set; using the embedded server in {where} ({server.address})")


def _qdrant_target(env: Environment, run: _Run, sources: Sources, lock_timeout: float) -> Any:
    from .stores import qdrant

    target = qdrant.QdrantTarget(env, client=sources.qdrant_client, lock_timeout=lock_timeout)
    if target.local and sources.qdrant_client is None:
        run.notice(f"qdrant: QDRANT_URL is not set; using local mode in {_shown_path(env.state_dir / 'qdrant')}")
    if target.key_over_plain_http:
        run.notice("qdrant: warning: QDRANT_API_KEY is sent over plain http; use https for remote servers")
    return target


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _load_declarations(chosen: list[str], sources: Sources, project: Project | None = None) -> dict[str, Any]:
    """Read every store's migrations and specs first, so a bad file stops the run before any write.

    They come from the caller, else the project directory's mongo_migrations/ and
    qdrant_specs/, else the ones beside the package.
    """
    def pick(given: Path | None, name: str, default: Path) -> Path:
        if given is not None:
            return given
        if project is not None and (project.root / name).is_dir():
            return project.root / name
        return default

    loaded: dict[str, Any] = {}
    if "postgres" in chosen:
        from .stores import postgres

        # loading checks the revision files: one that fails to import, or a branched history, stops here
        postgres._script(sources.alembic_scripts or (project.alembic_scripts if project is not None else None))
    if "mongo" in chosen:
        from .stores import mongo

        loaded["mongo"] = mongo.load_migrations(pick(sources.mongo_migrations, "mongo_migrations",
                                                     mongo.MIGRATIONS_DIR))
    if "qdrant" in chosen:
        from .stores import qdrant

        loaded["qdrant"] = qdrant.load_specs(pick(sources.qdrant_specs, "qdrant_specs", qdrant.SPECS_DIR))
        if project is not None:
            qdrant.check_spec_names(loaded["qdrant"], _resolvable(project))
    return loaded


def _resolvable(project: Project) -> list[Environment]:
    """Every environment whose settings resolve; one that does not fails when it is used itself."""
    from .errors import MomentryError

    found = []
    for name in project.registry.names:
        try:
            found.append(project.environment(name, one_of_many=True))
        except MomentryError:
            continue
    return found


Consent = Callable[[str], bool]


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


@dataclass
class _Migration:
    """One run over environments and stores: its options, and how a target's error becomes its outcome."""

    project: Project
    envs: list[Environment]
    run: _Run
    sources: Sources
    declared: dict[str, Any]
    apply: bool
    dry_run: bool
    keep_going: bool
    lock_timeout: float = 30.0
    consent: Consent = _refuse
    recreate_qdrant: bool = False
    parallel: int = 1
    early: dict[tuple[str, str], BaseException] = field(default_factory=dict)  # found before any write

    @property
    def emit(self) -> Emit:
        return self.run.emit

    @property
    def scripts(self) -> Path | None:
        return _scripts(self.project, self.sources)

    def planned(self, plan: TargetPlan) -> TargetOutcome:
        self.emit("planned", plan)
        if not plan.pending:
            return TargetOutcome(plan, "up to date")
        return TargetOutcome(plan, "would apply" if self.dry_run else "pending")

    def done(self, plan: TargetPlan, applied: Sequence[Step]) -> TargetOutcome:
        return TargetOutcome(plan, "upgraded" if applied else "up to date", tuple(applied))

    def failed(self, plan: TargetPlan, exc: BaseException, env: Environment) -> TargetOutcome:
        """``exc`` as this target's outcome, or raised: without keep_going, and for a refusal or
        bad input when the run covers one environment (it stops before any write)."""
        from .environments import scrub
        from .errors import EXIT_FAILURE, MomentryError, RefusedError

        if not self.keep_going:
            raise exc
        if isinstance(exc, MomentryError):
            if len(self.envs) == 1 and exc.exit_code != EXIT_FAILURE:
                raise exc
            message = str(exc)
        else:
            lines = str(exc).strip().splitlines()
            message = f"{_where(plan)}: unexpected {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
        message = scrub(message, env.secrets())
        self.emit("failed", message)
        return TargetOutcome(plan, "refused" if isinstance(exc, RefusedError) else "failed", (), message)


_TARGET_KIND = {"postgres": "schema", "mongo": "database", "qdrant": "collection"}


def _where(plan: TargetPlan) -> str:
    return f"{plan.store} {plan.env} ({_TARGET_KIND.get(plan.store, 'target')} {plan.target})"


def _migration_run(project: Project, command: str, env_names: str | Sequence[str] | None, *,
                   stores: Sequence[str] | None, apply: bool, dry_run: bool, env_file: Path | None = None,
                   overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
                   sources: Sources = Sources(), recreate_qdrant: bool = False, lock_timeout: float = 30.0,
                   consent: Consent = _refuse, keep_going: bool = False, parallel: int = 1) -> RunResult:
    if parallel < 1:
        raise ConfigError("--parallel must be 1 or more")
    envs, several = _environments(project, env_names, env_file, overrides)
    chosen = _stores(stores)
    declared = _load_declarations(chosen, sources, project)
    result = RunResult(command, [e.name for e in envs], dry_run=dry_run, parallel=parallel)
    run = _Run(result, emit)
    if several:
        _note_ignored_isolation_vars(project, run)
    work = _Migration(project, envs, run, sources, declared, apply=apply, dry_run=dry_run, keep_going=keep_going,
                      lock_timeout=lock_timeout, consent=consent, recreate_qdrant=recreate_qdrant,
                      parallel=parallel)
    runners = {"postgres": _PostgresRun, "mongo": _MongoRun, "qdrant": _QdrantRun}
    chosen_runners = [runners[store](work) for store in chosen]
    for runner in chosen_runners:  # every refusal, in any store, before the first write
        runner.preflight()
    for runner in chosen_runners:
        result.targets.extend(runner.run())
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
             f"data {_shown_path(Path(str(row['data_dir'])))}" + (f"  ({row['detail']})" if row["detail"] else "")
             for row in rows]
    if not project.embedded:
        lines.append("MOMENTRY_EMBEDDED=off: commands do not start these servers")
    return ActionResult("embedded status", "*", lines=lines, data={"servers": rows, "enabled": project.embedded})


def verify(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
           env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
           emit: Emit = _ignore, sources: Sources = Sources()) -> Any:
    """Prove one environment's isolation from every other, store by store."""
    from . import verify as checks
    from .errors import MomentryError

    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    others = [project.environment(name, one_of_many=True) for name in project.registry.names if name != env.name]
    checkable = (*STORES, "redis", "dirs")
    unknown = [s for s in stores or () if s not in checkable]
    if unknown:
        raise ConfigError(f"unknown store {unknown[0]!r}; verify knows: {', '.join(checkable)}")
    chosen = [s for s in checkable if not stores or s in stores]
    declared = _load_declarations(chosen, sources, project)
    result = checks.VerifyResult("verify", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    if "postgres" in chosen:

        try:
            target = _postgres_target(env, run)
            checks.check_postgres(result, env, target, script_location=_scripts(project, sources))
        except MomentryError as exc:
            result.add("postgres", "server reachable", [str(exc)])
    if "mongo" in chosen:
        from .stores import mongo

        mtarget = mongo.MongoTarget(env, client=sources.mongo_client)
        try:
            _embedded_mongo(mtarget, run)
        except MomentryError as exc:
            result.add("mongo", "server reachable", [str(exc)])
        else:
            primary = next((o for o in others if o.primary), None) if not env.primary else None
            checks.check_mongo(result, env, others, mtarget, declared["mongo"],
                               primary=mongo.MongoTarget(primary, client=sources.mongo_client) if primary else None)
    if "qdrant" in chosen:
        checks.check_qdrant(result, env, others, _qdrant_target(env, run, sources, 30.0), declared["qdrant"])
    if "redis" in chosen:
        checks.check_redis(result, env, others)
    if "dirs" in chosen:
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


def resettable(project: Project, env_name: str) -> Environment:
    """Resolve an environment that may be reset; prod is refused whatever the flags."""
    from .errors import RefusedError

    env = project.environment(env_name)
    if env.primary:
        raise RefusedError("reset is refused for prod, whatever the flags: it would destroy production data")
    return env


@dataclass(frozen=True)
class _Drop:
    """One store's part of a reset: what it removes, how to check it can, and how to remove it."""

    store: str
    label: str  # "dev (schema dev)", as the store's errors name its target
    what: str  # "schema dev", for the already-dropped / not-dropped lists
    check: Callable[[], Any]
    drop: Callable[[], Any]


def _reset_drops(env: Environment, chosen: list[str], every_store: bool, run: _Run, sources: Sources,
                 declared: dict[str, Any], closing: Any) -> list[_Drop]:
    """What a reset of ``env`` removes, store by store, in the order it removes them."""
    drops: list[_Drop] = []
    if "postgres" in chosen:
        from .stores import postgres

        target = _postgres_target(env, run)
        drops.append(_Drop("postgres", f"{env.name} (schema {env.schema})", f"schema {env.schema}",
                           lambda: postgres.preflight_drop(target),
                           lambda: env.schema if postgres.drop_schema(target) else None))
    if "mongo" in chosen:
        from .stores import mongo

        mtarget = mongo.MongoTarget(env, client=sources.mongo_client)
        if mtarget.configured:
            _embedded_mongo(mtarget, run)
            closing.callback(mtarget.close)
            drops.append(_Drop("mongo", mtarget.label, f"database {env.mongo_database}",
                               lambda: mongo.preflight_drop(mtarget),
                               lambda: env.mongo_database if mongo.drop_database(mtarget) else None))
    if "qdrant" in chosen:
        from .stores import qdrant

        qtarget = _qdrant_target(env, run, sources, 30.0)
        names = ", ".join(env.qdrant_collection_for(spec.name) for spec in declared["qdrant"])

        def drop_collections() -> list[str]:
            with qtarget.session() as client:
                return qdrant.drop(client, env, declared["qdrant"])

        drops.append(_Drop("qdrant", f"{env.name} (collection {names})", f"collection {names}",
                           lambda: qdrant.preflight_drop(qtarget, declared["qdrant"]), drop_collections))
    if env.redis_url is not None and every_store:
        from .stores import redis as redis_store

        url = env.redis_url
        drops.append(_Drop("redis", f"{env.name} (prefix {env.redis_prefix})", f"keys {env.redis_prefix}*",
                           lambda: redis_store.preflight(url.reveal(), env.redis_prefix, url.masked, env.secrets()),
                           lambda: redis_store.delete_keys(url.reveal(), env.redis_prefix)))
    return drops


def _preflight(env: Environment, drops: list[_Drop]) -> None:
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


def _drop_all(env: Environment, drops: list[_Drop]) -> dict[str, Any]:
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
    chosen = _stores(stores)
    declared = _load_declarations(chosen, sources, project)  # check every declaration before dropping anything
    result = ActionResult("reset", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    with ExitStack() as closing:
        drops = _reset_drops(env, chosen, not stores, run, sources, declared, closing)
        _preflight(env, drops)
        dropped = _drop_all(env, drops)
    for store, what in dropped.items():
        result.lines.append(f"{store} {env.name}: dropped {what if what not in (None, []) else 'nothing (absent)'}"
                            if store != "redis" else f"redis {env.name}: deleted {what} keys under {env.redis_prefix}")
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
    from .stores import qdrant

    env = project.environment(env_name)
    specs = _load_declarations(["qdrant"], sources, project)["qdrant"]
    result = ActionResult("prune", env.name)
    target = _qdrant_target(env, _Run(result, emit), sources, 30.0)  # type: ignore[arg-type]
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
    declared = _load_declarations(chosen, sources, project)
    for store, given, variable in (("mongo", sources.mongo_client, "mongodb_url"),
                                   ("qdrant", sources.qdrant_client, "qdrant_url")):
        if store in chosen and given is None and (
                _url_of(getattr(source, variable)) != _url_of(getattr(dest, variable))):
            raise ConfigError(f"clone copies {store} data within one server; {source.name} and {dest.name} "
                              f"have different {variable.upper()} settings")
    result = ActionResult("clone", dest.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    copied: dict[str, dict[str, int]] = {}
    if "mongo" in chosen:  # an embedded server that cannot start stops the clone before any write
        from .stores import mongo

        src_m = mongo.MongoTarget(source, client=sources.mongo_client)
        if src_m.configured:
            _embedded_mongo(src_m, run)
    if "postgres" in chosen:
        from .stores import postgres

        src_t, dst_t = _postgres_target(source, run), postgres.PgTarget(dest)
        if postgres.plan(dst_t, script_location=_scripts(project, sources)).pending:
            raise RefusedError(f"postgres {dest.name} is not at head; run momentry-db migrate --env {dest.name} first")
        _refuse_source_behind(postgres.plan(src_t, script_location=_scripts(project, sources)))
        copied["postgres"] = postgres.clone_tables(src_t, dst_t, selected, limit, emit)
    if "mongo" in chosen:
        from .stores import mongo

        if not src_m.configured:
            run.skip("mongo", "MONGODB_URL is not set")
        else:
            dst_m = mongo.MongoTarget(dest, client=src_m.connect().client)
            copied["mongo"] = mongo.clone(src_m, dst_m, limit, emit)
            src_m.close()
    if "qdrant" in chosen:
        from .stores import qdrant

        with _qdrant_target(source, run, sources, 30.0).session() as client:
            copied["qdrant"] = qdrant.clone_points(client, source, dest, declared["qdrant"], limit, emit)
    for store, counts in copied.items():
        for name, count in counts.items():
            result.lines.append(f"{store} {source.name} -> {dest.name}: {name}: {count} copied")
    result.data = {"from": source.name, "to": dest.name, "copied": copied}
    return result


def _refuse_source_behind(source: TargetPlan) -> None:
    """The destination is at head; a source behind it has other columns, so nothing is copied."""
    from .errors import StoreError

    if source.pending:
        at = ", ".join(source.current) if source.current else "base"
        raise StoreError(source.store, f"{source.env} (schema {source.target})", "clone",
                         f"{source.env} is at revision {at}, behind {', '.join(source.head)}; run "
                         f"momentry-db migrate --env {source.env} first, then clone again")


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
    from .stores import postgres

    env = project.environment(env_name)
    result = ActionResult("adopt", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    target = _postgres_target(env, run)
    plan = postgres.plan(target, script_location=_scripts(project, sources))
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
    postgres.stamp(target, script_location=_scripts(project, sources), project=project)
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


def check(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
          env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
          emit: Emit = _ignore, sources: Sources = Sources()) -> ActionResult:
    """Exit 0 only when every store is at head and the live schema matches the models."""
    from .stores import postgres

    st = status(project, env_name, stores=stores, env_file=env_file, overrides=overrides, emit=emit,
                sources=sources)
    result = ActionResult("check", st.env, notices=st.notices, skipped=st.skipped)
    pending = [s for t in st.targets for s in t.pending]
    drift: list[str] = []
    pg_pending = any(s.store == "postgres" for s in pending)
    if "postgres" in _stores(stores) and pg_pending:
        result.notices.append("postgres: drift is compared once the schema is at head; migrate, then check again")
        emit("notice", result.notices[-1])
    elif "postgres" in _stores(stores):
        env = project.environment(env_name, env_file=env_file, overrides=overrides)
        drift = [f"postgres {env.name} (schema {env.schema}): {d}"
                 for d in postgres.compare_live(postgres.PgTarget(env))]
    drift += _mongo_drift(project, st, result, env_name, env_file, overrides, emit, sources)
    result.ok = not pending and not drift
    result.lines += [f"pending: {s.store} {s.env} ({s.target}): {s.name} {s.description}".rstrip() for s in pending]
    result.lines += [f"drift: {d}" for d in drift[:20]] + ([f"drift: and {len(drift) - 20} more"] if len(drift) > 20 else [])
    result.lines.append(f"check {st.env}: " + ("every store at head, no drift" if result.ok else
                                                 f"{len(pending)} pending step(s), {len(drift)} drift(s)"))
    result.data = {"pending": [s.to_json() for s in pending], "drift": drift,
                   "targets": [t.to_json() for t in st.targets]}
    return result


def _mongo_drift(project: Project, st: RunResult, result: ActionResult, env_name: str, env_file: Path | None,
                 overrides: Mapping[str, str | None] | None, emit: Emit, sources: Sources) -> list[str]:
    """Check's Mongo part: the live database against the shape recorded at its head."""
    from .stores import mongo, mongo_shape

    plans = [t for t in st.targets if t.store == "mongo"]
    if not plans:  # not chosen, or skipped with its reason already given
        return []
    if plans[0].pending:
        result.notices.append("mongo: drift is compared once the database is at head; migrate, then check again")
        emit("notice", result.notices[-1])
        return []
    if not plans[0].current:
        return []
    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    head, where = plans[0].current[-1], f"mongo {env.name} (database {env.mongo_database})"
    target = mongo.MongoTarget(env, client=sources.mongo_client)
    try:
        drift = mongo_shape.drift_from_record(target.connect(), head, mongo.BOOKKEEPING)
    finally:
        target.close()
    if drift is None:
        return [f"{where}: not checkable: no shape recorded at {head} (migrated before shapes were recorded); "
                f"run momentry-db migrate --env {env.name} to record the live one as its baseline"]
    return [f"{where}: {d}" for d in drift]


def lint(project: Project, env_name: str, *, env_file: Path | None = None,
         overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
         sources: Sources = Sources()) -> ActionResult:
    """Lint the SQL of the pending PostgreSQL revisions for risky DDL (squawk)."""
    from .lint import lint_sql
    from .stores import postgres

    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    result = ActionResult("lint", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    plan = postgres.plan(_postgres_target(env, run), with_sql=True, script_location=_scripts(project, sources),
                         project=project)
    findings = lint_sql(plan.sql, f"postgres {env.name} (schema {env.schema})") if plan.sql else []
    result.ok = not findings
    result.lines += [str(f) for f in findings]
    result.lines.append(f"lint {env.name}: {len(plan.pending)} pending revision(s), {len(findings)} risky statement(s)")
    result.data = {"pending": [s.to_json() for s in plan.pending], "findings": [f.to_json() for f in findings]}
    return result


def downgrade(project: Project, env_name: str, revision: str, *, consent: Consent = _refuse,
              emit: Emit = _ignore, sources: Sources = Sources(), lock_timeout: float = 30.0) -> ActionResult:
    """Downgrade one environment's schema to a revision.

    Prod always needs explicit consent; another environment needs it when any of its
    tables holds rows, since a downgrade may drop them.
    """
    from .errors import RefusedError
    from .stores import postgres

    env = project.environment(env_name)
    _known_revision(revision, _scripts(project, sources))
    if env.primary and not consent(f"downgrade prod (schema {env.schema}) to {revision}"):
        raise RefusedError("downgrade of prod needs explicit consent: confirm on a terminal, or pass --yes")
    result = ActionResult("downgrade", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    target = _postgres_target(env, run)
    target.lock_wait = lock_timeout
    populated = [] if env.primary else postgres.tables_with_rows(target)
    if populated and not consent(f"downgrade {env.name} (schema {env.schema}) to {revision}; tables holding rows "
                                 f"may be dropped: {', '.join(populated)}"):
        raise RefusedError(f"downgrade of {env.name} (schema {env.schema}) may drop tables holding rows "
                           f"({', '.join(populated[:5])}{', ...' if len(populated) > 5 else ''}); confirm on a "
                           "terminal, or pass --yes; nothing was changed")
    undone = postgres.downgrade(target, revision, script_location=_scripts(project, sources), project=project)
    result.lines += [f"postgres {env.name} (schema {env.schema}): downgraded {r}" for r in undone]
    result.lines.append(f"downgraded {env.name} to {revision}: {len(undone)} revision(s) undone")
    result.data = {"undone": undone, "to": revision}
    return result


def _known_revision(revision: str, scripts: Path | None) -> None:
    """A downgrade target must be base or a revision of this checkout."""
    from alembic.util import CommandError

    from .stores import postgres

    if revision == "base":
        return
    if revision in ("head", "heads"):
        raise ConfigError("downgrade --to head goes nowhere; name a revision below the current one, or base")
    try:
        found = postgres._script(scripts).get_revision(revision)
    except CommandError:
        found = None
    if found is None:
        raise ConfigError(f"unknown revision {revision!r}; use base or one of the revisions in migrations/versions")


def history(project: Project, env_name: str, *, limit: int = 50, stores: Sequence[str] | None = None,
            emit: Emit = _ignore, sources: Sources = Sources()) -> ActionResult:
    """Show the steps applied to one environment: time, store, step, duration and outcome."""
    env = project.environment(env_name)
    chosen = _stores(stores)
    result = ActionResult("history", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    entries: list[dict[str, Any]] = []
    if "postgres" in chosen:
        from .stores import postgres

        for row in postgres.history(_postgres_target(env, run), limit):
            entries.append({**row, "recorded_at": row["recorded_at"].isoformat(timespec="seconds")})
    if "mongo" in chosen:
        from .stores import mongo

        with _mongo(env, run, sources) as mtarget:
            if mtarget is not None:
                entries.extend(mongo.history(mtarget, limit))
    if "qdrant" in chosen:
        from .stores import qdrant

        specs = _load_declarations(["qdrant"], sources, project)["qdrant"]
        with _qdrant_target(env, run, sources, 30.0).session() as client:
            entries.extend(qdrant.history(client, env, specs))
    entries.sort(key=lambda e: str(e.get("recorded_at", "")), reverse=True)
    entries = entries[:limit]
    for e in entries:
        ms = e.get("duration_ms")
        result.lines.append(f"{e.get('recorded_at')}  {e.get('store'):<8} {e.get('step')}  "
                            f"{e.get('outcome')}" + (f" in {ms} ms" if ms is not None else "")
                            + (f": {e['error']}" if e.get("error") else ""))
    if not entries:
        result.lines.append(f"no history recorded for {env.name}")
    result.data = {"history": entries}
    return result


class _PostgresRun:
    """PostgreSQL's part of a run: read every schema's version, plan the ones behind, then upgrade them
    public first, compiled where schemas stand at the same revision, else through Alembic (in worker
    processes with ``parallel`` > 1)."""

    def __init__(self, work: _Migration) -> None:
        from .stores import postgres

        self.work, self.pg = work, postgres
        self.targets: list[Any] = []

    def preflight(self) -> None:
        w = self.work
        if w.envs:
            _postgres_target(w.envs[0], w.run)  # the embedded-server notice, once
        self.targets = [self.pg.PgTarget(env, emit=w.emit, lock_wait=w.lock_timeout) for env in w.envs]

    def run(self) -> list[TargetOutcome]:
        w, pg = self.work, self.pg
        outcomes: dict[str, TargetOutcome] = {}
        plans: dict[str, TargetPlan] = {}
        if w.apply:
            versions = pg.current_versions(self.targets)
            head = pg.heads(w.scripts)
        for t in self.targets:
            if w.apply and versions[t.schema] == head:  # at head after one query: nothing to plan
                outcomes[t.schema] = w.planned(TargetPlan("postgres", t.env.name, t.schema, head, head))
                continue
            try:
                plan = pg.plan(t, with_sql=w.dry_run, script_location=w.scripts, project=w.project)
                if w.apply and plan.pending:
                    _refuse_unmanaged(t.env, plan)
                    if t.primary:
                        _consent_to_risks(t, plan, w.consent, w.scripts)
            except Exception as exc:  # noqa: BLE001 - this target's outcome
                outcomes[t.schema] = w.failed(unplanned("postgres", t.env.name, t.schema), exc, t.env)
                continue
            outcomes[t.schema] = w.planned(plan)
            plans[t.schema] = plan
        pending = [t for t in self.targets if t.schema in plans and plans[t.schema].pending]
        if w.apply and pending:
            results = self._upgrade(pending, versions)
            for t in pending:
                applied, error = results[t.schema]
                plan = plans[t.schema]
                if error is None:
                    outcomes[t.schema] = w.done(plan, [s for s in plan.pending if s.name in applied])
                else:
                    outcomes[t.schema] = w.failed(plan, error, t.env)
        return [outcomes[t.schema] for t in self.targets]

    def _upgrade(self, pending: list[Any], versions: Mapping[str, Any]) -> dict[str, tuple[list[str], Any]]:
        """Upgrade each target: (revisions applied, the error that stopped it) per schema."""
        w, pg = self.work, self.pg
        done: dict[str, tuple[list[str], Any]] = {}
        primary = [t for t in pending if t.primary]
        others = [t for t in pending if not t.primary]
        if primary:  # public first
            self._alembic(primary)
        starts: dict[tuple[str, ...], list[Any]] = {}
        left: list[Any] = []
        for t in others:  # compile each revision path once for the schemas at the same revision
            if versions[t.schema] == ():  # an empty alembic_version (downgraded to base): Alembic's path
                left.append(t)
            else:
                starts.setdefault(versions[t.schema] or (), []).append(t)
        for start, group in starts.items():  # one schema alone gains nothing from compiling: Alembic runs it
            left += (self._guarded(pg.upgrade_compiled, group, start, script_location=w.scripts) or []
                     if len(group) > 1 else group)
        if left and w.parallel > 1:
            done.update(self._workers(left))
        elif left:
            self._alembic(left)
        for t in pending:
            if t.schema not in done:
                done[t.schema] = (list(t.applied), t.error)
        return done

    def _alembic(self, targets: list[Any]) -> None:
        self._guarded(self.pg.upgrade_many, targets, script_location=self.work.scripts, project=self.work.project)

    def _guarded(self, fn: Callable[..., Any], targets: list[Any], *args: Any, **kwargs: Any) -> Any:
        """What stops a fan-out step early becomes the outcome of each target not yet done."""
        try:
            return fn(targets, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one outcome per target, never an aborted run
            for t in targets:
                if t.error is None and not t.applied:
                    t.error = self.pg.failure(t, exc)
            return None

    def _workers(self, targets: list[Any]) -> dict[str, tuple[list[str], Any]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .errors import MomentryError

        w, pg = self.work, self.pg
        parallel = w.parallel
        chunks = [targets[i::parallel] for i in range(min(parallel, len(targets)))]
        done: dict[str, tuple[list[str], Any]] = {}
        with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(pg.upgrade_chunk, [t.env for t in chunk], w.scripts, w.lock_timeout)
                       for chunk in chunks]
            for chunk, future in zip(chunks, futures):
                try:
                    rows = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died: each of its targets failed
                    for t in chunk:
                        done[t.schema] = ([], pg.failure(t, exc))
                    continue
                for schema, applied, error in rows:
                    done[schema] = (applied, MomentryError(error) if error else None)
        return done


class _MongoRun:
    """MongoDB's part of a run: plan, then apply, each environment's database in turn."""

    def __init__(self, work: _Migration) -> None:
        self.work = work
        self.first: Any = None

    def preflight(self) -> None:
        from .stores import mongo

        w = self.work
        if w.envs:  # an embedded server that cannot start stops the run before any write
            self.first = mongo.MongoTarget(w.envs[0], client=w.sources.mongo_client)
            if self.first.configured:
                _embedded_mongo(self.first, w.run)

    def run(self) -> list[TargetOutcome]:
        from .stores import mongo

        w = self.work
        migrations = w.declared["mongo"]
        outcomes: list[TargetOutcome] = []
        for i, env in enumerate(w.envs):
            target = self.first if i == 0 else mongo.MongoTarget(env, client=w.sources.mongo_client)
            if not target.configured:
                continue
            plan = unplanned("mongo", env.name, env.mongo_database)
            try:
                plan = mongo.plan(target, migrations)
                outcome = w.planned(plan)
                if w.apply:
                    outcome = w.done(plan, mongo.apply(target, migrations, emit=w.emit, lock_timeout=w.lock_timeout,
                                                       notice=w.run.notice))
                outcomes.append(outcome)
            except Exception as exc:  # noqa: BLE001 - this target's outcome
                outcomes.append(w.failed(plan, exc, env))
            finally:
                target.close()
        if w.envs and not any(mongo_configured(e, w.sources) for e in w.envs):
            w.run.skip("mongo", "MONGODB_URL is not set")
        return outcomes


class _QdrantRun:
    """Qdrant's part of a run: one plan per declared collection, applied in one session per environment."""

    def __init__(self, work: _Migration) -> None:
        self.work = work

    def preflight(self) -> None:
        from .errors import MomentryError
        from .stores import qdrant

        w = self.work
        if not w.apply:
            return
        for env in w.envs:  # an immutable change without --recreate-qdrant is refused before any write
            target = qdrant.QdrantTarget(env, client=w.sources.qdrant_client, lock_timeout=w.lock_timeout)
            try:
                found = qdrant.check_apply(target, w.declared["qdrant"], recreate=w.recreate_qdrant)
            except MomentryError as exc:
                if len(w.envs) == 1 or not w.keep_going:
                    raise
                found = exc
            if found is not None:  # reported as this target's outcome, without waiting on the server again
                w.early[("qdrant", env.name)] = found

    def run(self) -> list[TargetOutcome]:
        from .stores import qdrant

        w = self.work
        specs = w.declared["qdrant"]
        outcomes: list[TargetOutcome] = []
        for env in w.envs:
            try:
                target = _qdrant_target(env, w.run, w.sources, w.lock_timeout)
                if ("qdrant", env.name) in w.early:
                    raise w.early[("qdrant", env.name)]
                cached = qdrant.cached_plans(target, specs)
                if cached is not None:  # local mode, unchanged since the last run: nothing to open
                    outcomes += [w.planned(p) for p in cached]
                    continue
                applied: list[Step] = []
                with target.session() as client:
                    bound = target.bound(client)  # one connection (and one local-mode lock) for plan and apply
                    plans = qdrant.plan(bound, specs)
                    for p in plans:
                        w.emit("planned", p)
                    if w.apply:
                        applied = qdrant.apply(bound, specs, recreate=w.recreate_qdrant, emit=w.emit)
                if w.apply or not any(p.pending for p in plans):
                    qdrant.write_stamp(target, specs)
                for p in plans:
                    mine = [s for s in applied if s.target == p.target]
                    outcomes.append(w.done(p, mine) if w.apply else
                                    TargetOutcome(p, "up to date" if not p.pending else
                                                  "would apply" if w.dry_run else "pending"))
            except Exception as exc:  # noqa: BLE001 - this target's outcome
                outcomes.append(w.failed(unplanned("qdrant", env.name, env.qdrant_collection), exc, env))
        return outcomes


def _note_ignored_isolation_vars(project: Project, run: _Run) -> None:
    names = project.process_isolation_vars()
    if names:
        run.notice(f"{', '.join(names)} in the process environment name(s) one environment's targets; "
                   "ignored when listing or migrating several (set them in each env file instead)")


def _url_of(secret: Any) -> str | None:
    return secret.reveal() if secret is not None else None


def mongo_configured(env: Environment, sources: Sources) -> bool:
    """Whether ``env`` has a MongoDB: a client given, MONGODB_URL, or the embedded server."""
    return sources.mongo_client is not None or env.mongodb_url is not None or env.embedded


def unlock(project: Project, env_name: str, store: str, *, yes: bool = False, emit: Emit = _ignore,
           sources: Sources = Sources()) -> ActionResult:
    """Show who holds one store's migration lock for an environment; with ``yes``, release it.

    Without ``yes`` the holder is named in the refusal and nothing changes. A lock that
    momentry-db may not release (a foreign PostgreSQL session, a local file lock) is
    refused either way, with what to do instead.
    """
    from .errors import RefusedError

    env = project.environment(env_name)
    if store not in STORES:
        raise ConfigError(f"unknown store {store!r}; unlock knows: {', '.join(STORES)}")
    result = ActionResult("unlock", env.name)
    run = _Run(result, emit)  # type: ignore[arg-type]
    with _lock_store(env, store, run, sources, project) as (module, target, extra):
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


@contextmanager
def _lock_store(env: Environment, store: str, run: _Run, sources: Sources,
                project: Project) -> Iterator[tuple[Any, Any, tuple[Any, ...]]]:
    """A store module, its target for ``env`` and what its held_locks needs besides the target."""
    if store == "postgres":
        from .stores import postgres

        yield postgres, _postgres_target(env, run), ()
    elif store == "mongo":
        from .stores import mongo

        with _mongo(env, run, sources) as target:
            if target is None:
                raise ConfigError(f"MONGODB_URL is not set for {env.name}; set it to the server whose lock "
                                  "should be released")
            yield mongo, target, ()
    else:
        from .stores import qdrant

        specs = _load_declarations(["qdrant"], sources, project)["qdrant"]
        yield qdrant, _qdrant_target(env, run, sources, 30.0), (specs,)
