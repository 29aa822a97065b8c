"""Store-agnostic plan values: what would run, computed before anything runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    """One unit of work in one store's target (a revision, a Mongo migration, a spec)."""

    store: str
    env: str
    target: str
    name: str
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TargetPlan:
    """Where one target stands and what is pending for it."""

    store: str
    env: str
    target: str
    current: tuple[str, ...]
    head: tuple[str, ...]
    pending: tuple[Step, ...] = ()
    sql: str | None = None
    notes: tuple[str, ...] = field(default=())
    unmanaged: tuple[str, ...] = ()  # model tables in a target that no migration history manages

    @property
    def up_to_date(self) -> bool:
        return not self.pending

    def raise_if_unmanaged(self) -> None:
        """Never create what a target built outside momentry-db already holds: that is adopt's job."""
        from .errors import RefusedError

        if self.pending and self.unmanaged:
            shown = ", ".join(self.unmanaged[:5]) + (
                f" and {len(self.unmanaged) - 5} more" if len(self.unmanaged) > 5 else "")
            raise RefusedError(f"{self.store} {self.env} (schema {self.target}) already holds {shown} but no "
                               f"alembic_version; run momentry-db adopt --env {self.env} instead of creating "
                               "them again")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "store": self.store,
            "env": self.env,
            "target": self.target,
            "current": list(self.current),
            "head": list(self.head),
            "pending": [s.to_json() for s in self.pending],
        }
        if self.sql is not None:
            data["sql"] = self.sql
        if self.notes:
            data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class TargetOutcome:
    """What one run did to one target (a store of an environment): its plan and its outcome.

    ``outcome`` is one of ``upgraded``, ``up to date``, ``failed`` or ``refused`` for a
    migration, ``would apply`` for a dry run and ``pending`` for status.
    """

    plan: TargetPlan
    outcome: str
    applied: tuple[Step, ...] = ()
    error: str | None = None

    @property
    def store(self) -> str:
        return self.plan.store

    @property
    def env(self) -> str:
        return self.plan.env

    @property
    def target(self) -> str:
        return self.plan.target

    @property
    def current(self) -> tuple[str, ...]:
        return self.plan.current

    @property
    def head(self) -> tuple[str, ...]:
        return self.plan.head

    @property
    def pending(self) -> tuple[Step, ...]:
        return self.plan.pending

    @property
    def sql(self) -> str | None:
        return self.plan.sql

    @property
    def notes(self) -> tuple[str, ...]:
        return self.plan.notes

    @property
    def ok(self) -> bool:
        return self.outcome not in ("failed", "refused")

    def to_json(self) -> dict[str, Any]:
        data = self.plan.to_json()
        sql, notes = data.pop("sql", None), data.pop("notes", None)
        data.update({"outcome": self.outcome, "applied": [s.name for s in self.applied], "error": self.error})
        if sql is not None:
            data["sql"] = sql
        if notes:
            data["notes"] = notes
        return data


def unplanned(store: str, env: str, target: str) -> TargetPlan:
    """The plan of a target that could not be read: nothing known about where it stands."""
    return TargetPlan(store, env, target, (), ())
