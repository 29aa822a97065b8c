"""Autogenerate sorts operations by the model marking; isolated runs never reach public."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command as alembic_command

from momentry_db import command
from momentry_db.errors import StoreError
from momentry_db.models import metadata
from momentry_db.settings import load_project
from momentry_db.stores import postgres
from tests.helpers import REPO



@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A private copy of migrations/, so generated revisions stay in this test."""
    target = tmp_path / "migrations"
    shutil.copytree(REPO / "migrations", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def lib_project(project):
    return load_project(project.root, project.environ)


def _config(lib_project, env: str, scripts: Path, meta: sa.MetaData | None = None):
    target = postgres.PgTarget(lib_project.environment(env))
    return postgres.alembic_config([target], project=lib_project, script_location=scripts, metadata=meta)


def _migrate_all(lib_project, scripts: Path) -> None:
    for env in ("prod", "dev"):
        command.migrate(lib_project, env, stores=["postgres"], sources=command.Sources(alembic_scripts=scripts))


def _with_column(table: str, column: sa.Column) -> sa.MetaData:
    meta = sa.MetaData(naming_convention=metadata.naming_convention)
    for t in metadata.sorted_tables:
        t.to_metadata(meta)
    meta.tables[table].append_column(column)
    return meta


def _function_body(source: str, name: str) -> str:
    match = re.search(rf"def {name}\(\) -> None:\n(.*?)(?=\n\ndef |\Z)", source, re.S)
    assert match, name
    return match.group(1)


def _code(body: str) -> list[str]:
    """The statements of a function body, without its docstring and comments."""
    return [line.strip() for line in body.splitlines()
            if line.strip() and not line.strip().startswith(("#", '"""'))]


def _generate(lib_project, scripts: Path, meta: sa.MetaData, message: str) -> str:
    before = set((scripts / "versions").glob("*.py"))
    alembic_command.revision(_config(lib_project, "prod", scripts, meta), message=message,
                             autogenerate=True, rev_id="0002")
    (new,) = set((scripts / "versions").glob("*.py")) - before
    return new.read_text()


def _columns(database, schema: str, table: str) -> set[str]:
    return {r[0] for r in database.query(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (schema, table))}


def test_autogenerate_finds_no_difference_for_public_or_dev(project, lib_project, scripts) -> None:
    _migrate_all(lib_project, scripts)
    for env in ("prod", "dev"):
        alembic_command.check(_config(lib_project, env, scripts))  # raises on any difference
    for args in (["check"], ["-x", "schema=dev", "check"]):
        result = project.alembic(*args)
        assert result.code == 0, result.err
        assert "No new upgrade operations detected." in result.out


def test_autogenerate_sees_drift_in_dev(project, lib_project, scripts, database) -> None:
    _migrate_all(lib_project, scripts)
    database.execute("ALTER TABLE dev.frames ADD COLUMN stray text")
    result = project.alembic("-x", "schema=dev", "check")
    assert result.code == 255  # alembic's CLI exits -1 on a failed check
    assert "New upgrade operations detected: [('remove_column', None, 'frames', Column('stray'" in result.out
    assert "stray" in result.out + result.err


def test_new_isolated_column_runs_once_per_schema(lib_project, scripts, database) -> None:
    _migrate_all(lib_project, scripts)
    source = _generate(lib_project, scripts, _with_column("videos", sa.Column("note", sa.Text())),
                       "video note")
    assert "op.add_column('videos'" in _function_body(source, "upgrade_isolated")
    assert _code(_function_body(source, "upgrade_shared")) == ["pass"]
    _migrate_all(lib_project, scripts)
    assert "note" in _columns(database, "public", "videos")
    assert "note" in _columns(database, "dev", "videos")


def test_new_shared_column_runs_in_public_only(lib_project, scripts, database) -> None:
    _migrate_all(lib_project, scripts)
    source = _generate(lib_project, scripts, _with_column("api_keys", sa.Column("label", sa.Text())),
                       "api key label")
    assert "op.add_column('api_keys'" in _function_body(source, "upgrade_shared")
    assert _code(_function_body(source, "upgrade_isolated")) == ["pass"]
    _migrate_all(lib_project, scripts)
    assert "label" in _columns(database, "public", "api_keys")
    assert "api_keys" not in database.tables("dev")
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0002",)]


def test_dev_run_missing_a_table_fails_and_never_touches_public(project, lib_project, scripts,
                                                                database) -> None:
    _migrate_all(lib_project, scripts)
    _generate(lib_project, scripts, _with_column("videos", sa.Column("note", sa.Text())), "video note")
    command.migrate(lib_project, "prod", stores=["postgres"], sources=command.Sources(alembic_scripts=scripts))
    database.execute("DROP TABLE dev.videos CASCADE")
    public_before = database.dump_schema("public")

    with pytest.raises(StoreError) as info:
        command.migrate(lib_project, "dev", stores=["postgres"], sources=command.Sources(alembic_scripts=scripts))
    message = str(info.value)
    assert message.startswith("postgres dev (schema dev): revision 0002 (video note) failed:")
    assert 'relation "videos" does not exist' in message
    assert database.dump_schema("public") == public_before
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]

    ini = project.root / "alembic.ini"
    ini.write_text(ini.read_text().replace(str(REPO / "migrations"), str(scripts)))
    result = project.alembic("-x", "schema=dev", "upgrade", "head")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1].startswith("error: postgres dev (schema dev): revision 0002")
    assert database.dump_schema("public") == public_before
