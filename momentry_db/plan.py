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

    @property
    def up_to_date(self) -> bool:
        return not self.pending

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
