"""The store interface: what a command may ask of a store, the values they share, and the registry.

A command asks each chosen store for its part of the work and renders the outcomes; it
never branches on a store's name. Stores are imported only when a command uses them, so
``momentry-db --help`` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..environments import Environment
from ..errors import ConfigError
from ..plan import Step, TargetOutcome, TargetPlan

#: Every store, in the order a run works through them, as "module:class".
REGISTRY = {
    "postgres": "momentry_db.stores.postgres_store:PostgresStore",
    "mongo": "momentry_db.stores.mongo_store:MongoStore",
    "qdrant": "momentry_db.stores.qdrant_store:QdrantStore",
    "redis": "momentry_db.stores.redis_store:RedisStore",
}
NAMES = tuple(REGISTRY)
KIND = {"postgres": "schema", "mongo": "database", "qdrant": "collection"}

Emit = Callable[[str, Any], None]
Consent = Callable[[str], bool]


def refuse(question: str) -> bool:
    """Consent that is never given."""
    return False


def where(plan: TargetPlan) -> str:
    """How a target is named in output: ``postgres dev (schema dev)``."""
    return f"{plan.store} {plan.env} ({KIND.get(plan.store, 'target')} {plan.target})"


def shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def declared_dir(ctx: Context, name: str, given: Path | None, default: Path) -> Path:
    """Where a store's declarations are: the caller's, else the project directory's, else the package's."""
    if given is not None:
        return given
    if (ctx.project.root / name).is_dir():
        return ctx.project.root / name  # type: ignore[no-any-return]
    return default


def same_server(store: str, given: Any, source: Environment, dest: Environment, variable: str) -> None:
    """clone copies within one server: the two environments must name the same one."""
    def url(secret: Any) -> str | None:
        return secret.reveal() if secret is not None else None

    if given is None and url(getattr(source, variable)) != url(getattr(dest, variable)):
        raise ConfigError(f"clone copies {store} data within one server; {source.name} and {dest.name} "
                          f"have different {variable.upper()} settings")


class Reporting(Protocol):
    """Where a store says what happened: notices (each said once), skipped stores, events."""

    emit: Emit

    def notice(self, text: str) -> None: ...

    def skip(self, store: str, reason: str) -> None: ...


@dataclass
class Context:
    """What every store operation of one command shares."""

    project: Any
    sources: Any  # command.Sources: where declarations come from, and injected clients
    run: Reporting
    lock_timeout: float = 30.0

    @property
    def emit(self) -> Emit:
        return self.run.emit

    @property
    def scripts(self) -> Path | None:
        """Where the Alembic revisions are: given by the caller, or the project's alembic.ini."""
        return self.sources.alembic_scripts or self.project.alembic_scripts


@dataclass
class MigrationWork(Context):
    """A migrate, plan or status run over several environments, and how an error becomes an outcome."""

    envs: list[Environment] = field(default_factory=list)
    declared: dict[str, Any] = field(default_factory=dict)
    apply: bool = False
    dry_run: bool = False
    keep_going: bool = False
    consent: Consent = refuse
    recreate_qdrant: bool = False
    parallel: int = 1

    def planned(self, plan: TargetPlan) -> TargetOutcome:
        self.emit("planned", plan)
        if not plan.pending:
            return TargetOutcome(plan, "up to date")
        return TargetOutcome(plan, "would apply" if self.dry_run else "pending")

    def done(self, plan: TargetPlan, applied: Sequence[Step]) -> TargetOutcome:
        return TargetOutcome(plan, "upgraded" if applied else "up to date", tuple(applied))

    def failed(self, plan: TargetPlan, exc: BaseException, env: Environment) -> TargetOutcome:
        """``exc`` as this target's outcome, or raised: without keep_going, and for a refusal or bad
        input when the run covers one environment (it stops before any write)."""
        from ..environments import scrub
        from ..errors import EXIT_FAILURE, MomentryError, RefusedError

        if not self.keep_going:
            raise exc
        if isinstance(exc, MomentryError):
            if len(self.envs) == 1 and exc.exit_code != EXIT_FAILURE:
                raise exc
            message = str(exc)
        else:
            lines = str(exc).strip().splitlines()
            message = f"{where(plan)}: unexpected {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
        message = scrub(message, env.secrets())
        self.emit("failed", message)
        return TargetOutcome(plan, "refused" if isinstance(exc, RefusedError) else "failed", (), message)


class Migration(Protocol):
    """One store's part of a migrate, plan or status run."""

    def preflight(self) -> None:
        """Raise (or record as a target's outcome) every refusal, before any store writes."""

    def run(self) -> list[TargetOutcome]:
        """Plan, and apply when asked: one outcome per target."""


@dataclass(frozen=True)
class Drop:
    """One store's part of a reset: what it removes, how to check it can, and how to remove it."""

    store: str
    label: str  # "dev (schema dev)", as the store's errors name its target
    what: str  # "schema dev", for the already-dropped / not-dropped lists
    check: Callable[[], Any]
    drop: Callable[[], Any]
    said: Callable[[Any], str] | None = None  # what the reset reports, from drop()'s result

    def line(self, env: str, dropped: Any) -> str:
        """The reset's line for this store: ``postgres dev: dropped dev``."""
        if self.said is not None:
            return f"{self.store} {env}: {self.said(dropped)}"
        return f"{self.store} {env}: dropped {dropped if dropped not in (None, []) else 'nothing (absent)'}"


class BasicStore(Protocol):
    """What a command may ask of every store, Redis included: verify's checks and a reset's drop."""

    name: str
    migrates: bool  # keeps declared steps: migrate, plan, status, check, history, clone and unlock use it

    def load(self, ctx: Context) -> Any: ...

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None: ...

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None: ...


class Store(BasicStore, Protocol):
    """What a command may ask of a store that keeps declared steps (PostgreSQL, MongoDB, Qdrant)."""

    name: str

    def load(self, ctx: Context) -> Any:
        """Read and check the store's declarations (revisions, migrations, specs) before any write."""

    def migration(self, work: MigrationWork) -> Migration:
        """Its part of a migrate, plan or status run."""

    def history(self, ctx: Context, env: Environment, declared: Any, limit: int) -> list[dict[str, Any]]:
        """The steps recorded for one environment."""

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None:
        """What a reset of ``env`` removes in this store (None: nothing configured)."""

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None:
        """Add this store's isolation checks to ``result``."""

    def drift(self, ctx: Context, env: Environment, plan: TargetPlan) -> list[str] | None:
        """The live target's differences from what its head declares (None: compared once at head)."""

    def clone_check(self, ctx: Context, source: Environment, dest: Environment) -> None:
        """Refuse a clone this store cannot do, before any store writes."""

    def clone(self, ctx: Context, source: Environment, dest: Environment, declared: Any,
              tables: Sequence[str], limit: int | None) -> dict[str, int] | None:
        """Copy the source's data into the destination (None: this store is skipped)."""

    def lock_target(self, ctx: Context, env: Environment, declared: Any) -> AbstractContextManager[Any]:
        """(module, target, extra arguments) for unlock's held_locks and release_lock."""


def store(name: str) -> Store:
    """The store registered under ``name``, imported on first use."""
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown store {name!r}; known: {', '.join(NAMES)}") from None
    return getattr(importlib.import_module(module), cls)()  # type: ignore[no-any-return]


def chosen(selected: Sequence[str] | None, *, migrating: bool = True) -> list[Store]:
    """The stores a command works on, in run order; an unknown name is bad input.

    A command over declared steps takes the stores that keep them; ``migrating=False``
    takes every store (verify's checks, a reset's drops), Redis included.
    """
    candidates = [store(name) for name in NAMES]
    known = [s.name for s in candidates if s.migrates or not migrating]
    picked = list(selected) if selected else known
    for name in picked:
        if name not in known:
            raise ConfigError(f"unknown store {name!r}; known: {', '.join(known)}")
    return [s for s in candidates if s.name in picked]
