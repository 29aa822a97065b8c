"""A migration lock as one store reports it, for the unlock command."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HeldLock:
    """Who holds one target's migration lock, and whether momentry-db may release it.

    ``token`` identifies this holder exactly, so a release never removes a lock that
    changed hands after it was shown.
    """

    store: str
    target: str  # "dev (database momentry_dev)"
    holder: str  # one line: who, since when, lease
    releasable: bool = True
    why_not: str = ""  # when not releasable: what the user can do instead
    token: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "target": self.target, "holder": self.holder,
                "releasable": self.releasable}

    def __str__(self) -> str:
        return f"{self.store} {self.target}: migration lock held by {self.holder}"
