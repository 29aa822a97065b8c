"""The store registry and its values: which stores a command takes, Redis's part, frozen targets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from momentry_db.errors import ConfigError
from momentry_db.settings import load_project
from momentry_db.stores.base import Drop, chosen


def test_commands_over_declared_steps_take_the_stores_that_keep_them() -> None:
    assert [s.name for s in chosen(None)] == ["postgres", "mongo", "qdrant"]
    assert [s.name for s in chosen(["qdrant", "postgres"])] == ["postgres", "qdrant"]
    with pytest.raises(ConfigError, match=r"^unknown store 'redis'; known: postgres, mongo, qdrant$"):
        chosen(["redis"])


def test_every_store_includes_redis_last() -> None:
    assert [s.name for s in chosen(None, migrating=False)] == ["postgres", "mongo", "qdrant", "redis"]
    assert [s.name for s in chosen(["redis", "mongo"], migrating=False)] == ["mongo", "redis"]
    with pytest.raises(ConfigError, match=r"^unknown store 'dirs'; known: postgres, mongo, qdrant, redis$"):
        chosen(["dirs"], migrating=False)


def _redis_env(url: str | None) -> SimpleNamespace:
    secret = SimpleNamespace(reveal=lambda: url, masked=url) if url else None
    return SimpleNamespace(name="dev", redis_prefix="mm:dev:", redis_url=secret, secrets=lambda: [])


def test_redis_drops_nothing_without_a_url_and_reports_its_deleted_keys() -> None:
    (redis,) = chosen(["redis"], migrating=False)
    assert redis.load(None) is None
    assert redis.drop(None, _redis_env(None), None, None) is None
    drop = redis.drop(None, _redis_env("redis://127.0.0.1:1/0"), None, None)
    assert (drop.store, drop.label, drop.what) == ("redis", "dev (prefix mm:dev:)", "keys mm:dev:*")
    assert drop.line("dev", 3) == "redis dev: deleted 3 keys under mm:dev:"


@pytest.mark.parametrize("dropped, line", [
    ("dev", "postgres dev: dropped dev"),
    (["momentry_dev_rule1"], "postgres dev: dropped ['momentry_dev_rule1']"),
    (None, "postgres dev: dropped nothing (absent)"),
    ([], "postgres dev: dropped nothing (absent)"),
])
def test_a_drop_reports_what_it_dropped(dropped: object, line: str) -> None:
    assert Drop("postgres", "dev (schema dev)", "schema dev", lambda: None, lambda: None).line("dev", dropped) == line


def test_targets_are_frozen(tmp_path: Path) -> None:
    from momentry_db.stores import mongo, postgres, qdrant

    env = load_project(tmp_path, {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}).environment("dev")
    pg = postgres.PgTarget(env, lock_wait=3)
    for target, name, value in [(pg, "lock_wait", 5.0), (mongo.MongoTarget(env), "client", object()),
                                (qdrant.QdrantTarget(env), "client", object())]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, name, value)
    assert dataclasses.replace(pg, lock_wait=5).lock_wait == 5 and pg.lock_wait == 3
    assert not pg.embedded and pg.url().startswith("postgresql")
