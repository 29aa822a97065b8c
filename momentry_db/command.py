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

STORES = ("postgres",)
Emit = Callable[[str, Any], None]


def _ignore(event: str, payload: Any) -> None:
    pass


@dataclass
class RunResult:
    """What a migrate, plan or status run found and did, per store and target."""

    command: str
    env: str
    targets: list[TargetPlan] = field(default_factory=list)
    applied: list[Step] = field(default_factory=list)
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
            "notices": self.notices,
        }


def _stores(selected: Sequence[str] | None) -> list[str]:
    chosen = list(selected) if selected else list(STORES)
    for store in chosen:
        if store not in STORES:
            raise ConfigError(f"unknown store {store!r}; known: {', '.join(STORES)}")
    return chosen


def _postgres_target(env: Environment, emit: Emit, notices: list[str]) -> Any:
    from .stores import postgres

    target = postgres.PgTarget(env, emit=emit)
    target.url()
    if target.embedded:
        notice = (f"postgres: DATABASE_URL is not set; using the embedded server in "
                  f"{_shown_path(env.state_dir / 'pg')} (database momentry)")
        notices.append(notice)
        emit("notice", notice)
    return target


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def migrate(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
            dry_run: bool = False, env_file: Path | None = None,
            overrides: Mapping[str, str | None] | None = None, emit: Emit = _ignore,
            script_location: Path | None = None) -> RunResult:
    """Plan and apply every pending step for one environment, store by store."""
    from .stores import postgres

    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    chosen = _stores(stores)
    result = RunResult("migrate", env.name, dry_run=dry_run)
    if "postgres" in chosen:
        target = _postgres_target(env, emit, result.notices)
        before = postgres.plan(target, with_sql=dry_run, script_location=script_location, project=project)
        emit("planned", before)
        result.targets.append(before)
        if not dry_run and before.pending:
            postgres.upgrade(target, script_location=script_location, project=project)
            result.applied.extend(s for s in before.pending if s.name in target.applied)
    return result


def status(project: Project, env_name: str, *, stores: Sequence[str] | None = None,
           env_file: Path | None = None, overrides: Mapping[str, str | None] | None = None,
           emit: Emit = _ignore, script_location: Path | None = None) -> RunResult:
    """Report the current and pending steps of one environment, per store."""
    from .stores import postgres

    env = project.environment(env_name, env_file=env_file, overrides=overrides)
    result = RunResult("status", env.name)
    if "postgres" in _stores(stores):
        target = _postgres_target(env, emit, result.notices)
        result.targets.append(postgres.plan(target, script_location=script_location, project=project))
    return result


def stop_embedded(project: Project) -> bool:
    """Stop the embedded PostgreSQL server of this project, if it runs."""
    from .stores.embedded import stop_embedded as stop

    return stop(project.state_dir)
