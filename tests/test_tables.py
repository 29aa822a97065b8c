"""The isolated/shared registry and the include_object hook that splits autogenerate by scope."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table

from momentry_db.models import SCOPE_KEY, Scope
from momentry_db.tables import (BOOKKEEPING_TABLES, include_object, isolated_tables, scope_of, shared_tables,
                                view_names)


def test_the_registry_splits_every_model_table_into_exactly_one_scope() -> None:
    isolated, shared = isolated_tables(), shared_tables()
    assert "videos" in isolated and "api_key_audit_log" in shared
    assert not isolated & shared
    assert scope_of("videos") is Scope.ISOLATED
    assert scope_of("api_key_audit_log") is Scope.SHARED
    assert scope_of("no_such_table") is None
    assert view_names() and not view_names() & (isolated | shared)


def test_the_registry_follows_the_marking_of_other_metadata() -> None:
    meta = MetaData()
    Table("a", meta, Column("id", Integer, primary_key=True), info={SCOPE_KEY: Scope.ISOLATED})
    Table("b", meta, Column("id", Integer, primary_key=True), info={SCOPE_KEY: Scope.SHARED})
    assert isolated_tables(meta) == {"a"}
    assert shared_tables(meta) == {"b"}


# (object type, name, scope, strays) -> included; each row has its mirror in the other scope.
CASES = [
    ("table", "videos", Scope.ISOLATED, frozenset(), True),
    ("table", "videos", Scope.SHARED, frozenset(), False),
    ("table", "api_key_audit_log", Scope.SHARED, frozenset(), True),
    ("table", "api_key_audit_log", Scope.ISOLATED, frozenset(), False),
    # an undeclared table found in an environment schema (a stray) is isolated...
    ("table", "leftover", Scope.ISOLATED, frozenset({"leftover"}), True),
    ("table", "leftover", Scope.SHARED, frozenset({"leftover"}), False),
    # ...every other undeclared table is shared
    ("table", "leftover", Scope.SHARED, frozenset(), True),
    ("table", "leftover", Scope.ISOLATED, frozenset(), False),
    ("table", "leftover", Scope.SHARED, frozenset({"other"}), True),
    # a declared table keeps its scope even when listed as a stray
    ("table", "api_key_audit_log", Scope.SHARED, frozenset({"api_key_audit_log"}), True),
    ("table", "api_key_audit_log", Scope.ISOLATED, frozenset({"api_key_audit_log"}), False),
    # views live in public: shared
    ("view", "any_view", Scope.SHARED, frozenset(), True),
    ("view", "any_view", Scope.ISOLATED, frozenset(), False),
    # columns, indexes and the like follow their table (decided at table level)
    ("column", "id", Scope.ISOLATED, frozenset(), True),
    ("index", "ix", Scope.SHARED, frozenset(), True),
    ("table", None, Scope.ISOLATED, frozenset(), True),
]


@pytest.mark.parametrize("type_, name, scope, strays, included", CASES)
def test_include_object_keeps_one_scope(type_: str, name: str | None, scope: Scope, strays: frozenset[str],
                                        included: bool) -> None:
    assert include_object(scope, strays=strays)(None, name, type_, True, None) is included


@pytest.mark.parametrize("name", sorted(BOOKKEEPING_TABLES))
@pytest.mark.parametrize("scope", list(Scope))
def test_bookkeeping_tables_are_never_in_either_scope(name: str, scope: Scope) -> None:
    assert include_object(scope, strays=frozenset({name}))(None, name, "table", True, None) is False


def test_include_object_asks_the_metadata_it_is_given() -> None:
    meta = MetaData()
    Table("videos", meta, Column("id", Integer, primary_key=True), info={SCOPE_KEY: Scope.SHARED})
    assert include_object(Scope.SHARED, meta)(None, "videos", "table", True, None) is True
    assert include_object(Scope.ISOLATED, meta)(None, "videos", "table", True, None) is False
