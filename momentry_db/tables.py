"""The isolated/shared registry, derived from the models' marking.

Everything that needs to know where a table lives (env.py, autogenerate,
verification) asks here, and this module asks the models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from sqlalchemy import MetaData

from .models import SCOPE_KEY, VIEWS, Scope, metadata

VERSION_TABLE = "alembic_version"
#: Tables momentry-db keeps beside the models in every schema; never drift, never data.
BOOKKEEPING_TABLES = frozenset({VERSION_TABLE, "momentry_history"})
IncludeObject = Callable[[Any, str | None, str, bool, Any], bool]


def scope_of(name: str, meta: MetaData = metadata) -> Scope | None:
    """The scope of a table in the models, or None when no model declares it."""
    table = meta.tables.get(name)
    return None if table is None else table.info[SCOPE_KEY]


@cache
def isolated_tables(meta: MetaData = metadata) -> frozenset[str]:
    """Names of the tables that every environment schema holds."""
    return frozenset(n for n, t in meta.tables.items() if t.info[SCOPE_KEY] is Scope.ISOLATED)


@cache
def shared_tables(meta: MetaData = metadata) -> frozenset[str]:
    """Names of the tables that only public holds."""
    return frozenset(n for n, t in meta.tables.items() if t.info[SCOPE_KEY] is Scope.SHARED)


def view_names() -> frozenset[str]:
    """Names of the shared views (public only)."""
    return frozenset(v.signature for v in VIEWS)


def include_object(scope: Scope, meta: MetaData = metadata,
                   strays: frozenset[str] = frozenset()) -> IncludeObject:
    """An Alembic ``include_object`` hook that keeps one scope's tables and views.

    ``strays`` are tables no model declares that exist in some environment
    schema; they are treated as isolated, every other undeclared table as shared.
    """

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "view":
            return scope is Scope.SHARED
        if type_ != "table" or name is None:
            return True
        if name in BOOKKEEPING_TABLES:
            return False
        declared = scope_of(name, meta)
        if declared is None:
            declared = Scope.ISOLATED if name in strays else Scope.SHARED
        return declared is scope

    return include
