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
from .plan import Step, TargetPlan
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
    """What a migrate, plan or status run found and did, per store and target."""

    command: str
    env: str
    targets: list[TargetPlan] = field(default_factory=list)
    applied: list[Step] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "env": self.env,
            "ok": True,
            "dry_run": self.dry_run,
            "targets": [t.to_json() for t in self.targets],
            "applied": [s.to_json() for s in self.applied],
            "skipped": self.skipped,
            "notices": self.notices,
        }


class _Run:
    """Shared plumbing of migrate and status: notices, skips and plans per store."""

    def __init__(self, result: RunResult, emit: Emit) -> None:
        self.result, self.emit = result, emit

    def notice(self, text: str) -> None:
        self.result.notices.append(text)
        self.emit("notice", text)

    def skip(self, store: str, reason: str) -> None:
        self.result.skipped.append({"store": store, "reason": reason})
        self.notice(f"{store}: skipped ({reason})")

    def planned(self, plan: TargetPlan) -> TargetPlan:
        self.result.targets.append(plan)
        self.emit("planned", plan)
        return plan


def _stores(selected: Sequence[str] | None) -> list[str]:
    chosen = list(selected) if selected else list(STORES)
    for store in chosen:
        if store not in STORES:
            raise ConfigError(f"unknown store {store!r}; known: {', '.join(STORES)}")
    return [s for s in STORES if s in chosen]  # always postgres, then mongo, then qdrant


def _postgres_target(env: Environment, run: _Run) -> Any:
    from .stores import postgres

    target = postgres.PgTarget(env, emit=run.emit)
    target.url()
    if target.embedded:
        run.notice(f"postgres: DATABASE_URL is not set; using the embedded server in "
                   f"{_shown_path(env.state_dir / 'pg')} (database momentry)")
    return target


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


def _load_declarations(chosen: list[str], sources: Sources) -> dict[str, Any]:
    """Read every store's migrations and specs first, so a bad file stops the run before any write."""
    loaded: dict[str, Any] = {}
    if "mongo" in chosen:
        from .stores import mongo

        loaded["mongo"] = mongo.load_migrations(sources.mongo_migrations or mongo.MIGRATIONS_DIR)
    if "qdrant" in chosen:
        from .stores import qdrant

        loaded["qdrant"] = qdrant.load_specs(sources.qdrant_specs or qdrant.SPECS_DIR)
    return loaded


def migrate(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
            dry_run: bool = False, recreate_qdrant: bool = False, env_file: Path | None = None,
            overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
            sources: Sources = Sources(), lock_timeout: float = 30.0) -> RunResult:
    """Plan and apply every pending step for one environment: postgres, then mongo, then qdrant."""
    result = RunResult("migrate", env_name, dry_run=dry_run)
    return _work(project, env_name, result, stores=stores, apply=not dry_run, with_sql=dry_run,
                 recreate_qdrant=recreate_qdrant, env_file=env_file, overrides=overrides, emit=emit,
                 sources=sources, lock_timeout=lock_timeout)


def status(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
           env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
           emit: Emit = _ignore, sources: Sources = Sources()) -> RunResult:
    """Report the current and pending steps of one environment, per store."""
    return _work(project, env_name, RunResult("status", env_name), stores=stores, apply=False,
                 with_sql=False, env_file=env_file, overrides=overrides, emit=emit, sources=sources)


def _work(project: Project, env_name: str, result: RunResult, *, stores: Sequence[str] | None,
          apply: bool, with_sql: bool, env_file: Path | None, overrides: Mapping[str, str | None] | None,
          emit: Emit, sources: Sources, recreate_qdrant: bool = False,
          lock_timeout: float = 30.0) -> RunResult:
    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    result.env = env.name
    chosen = _stores(stores)
    declared = _load_declarations(chosen, sources)
    run = _Run(result, emit)
    if "postgres" in chosen:
        from .stores import postgres

        target = _postgres_target(env, run)
        before = run.planned(postgres.plan(target, with_sql=with_sql, script_location=sources.alembic_scripts,
                                           project=project))
        if apply and before.pending:
            postgres.upgrade(target, script_location=sources.alembic_scripts, project=project)
            result.applied.extend(s for s in before.pending if s.name in target.applied)
    if "mongo" in chosen:
        from .stores import mongo

        mtarget = mongo.MongoTarget(env, client=sources.mongo_client)
        if not mtarget.configured:
            run.skip("mongo", "MONGODB_URL is not set")
        else:
            try:
                run.planned(mongo.plan(mtarget, declared["mongo"]))
                if apply:
                    result.applied.extend(mongo.apply(mtarget, declared["mongo"], emit=emit,
                                                      lock_timeout=lock_timeout))
            finally:
                mtarget.close()
    if "qdrant" in chosen:
        from .stores import qdrant

        qtarget = _qdrant_target(env, run, sources, lock_timeout)
        with qtarget.session() as client:
            qtarget.client = client  # one connection (and one local-mode lock) for plan and apply
            for plan in qdrant.plan(qtarget, declared["qdrant"]):
                run.planned(plan)
            if apply:
                result.applied.extend(qdrant.apply(qtarget, declared["qdrant"], recreate=recreate_qdrant,
                                                   emit=emit))
    return result


def stop_embedded(project: Project) -> bool:
    """Stop the embedded PostgreSQL server of this project, if it runs."""
    from .stores.embedded import stop_embedded as stop

    return stop(project.state_dir)
