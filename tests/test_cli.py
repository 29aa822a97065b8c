"""Bad input: one clear line, exit 2, nothing written, no secret shown."""

from __future__ import annotations

import pytest

HOSTILE = ["dev; drop schema public", '"dev"', "Dev", "a" * 64, "pg_temp", "public"]


def _schemas(database) -> set[str]:
    return {r[0] for r in database.query("SELECT nspname FROM pg_namespace")}


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ")
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schema_from_the_environment_is_refused_before_connecting(project, silent_server,
                                                                          schema: str) -> None:
    port, accepted = silent_server
    result = project.cli("migrate", "--env", "dev", env={
        "DATABASE_SCHEMA": schema, "DATABASE_URL": f"postgresql://u@127.0.0.1:{port}/db"})
    assert result.code == 2
    assert "schema" in _one_error_line(result.err)
    assert accepted == []  # no connection was attempted


@pytest.mark.parametrize("schema", [s for s in HOSTILE if s != "public"])  # public is prod's own
def test_hostile_schema_from_x_argument_is_refused(project, database, schema: str) -> None:
    before = _schemas(database)
    result = project.alembic("-x", f"schema={schema}", "upgrade", "head")
    assert result.code == 2
    assert "Traceback" not in result.err
    assert _schemas(database) == before


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schema_from_the_env_file_is_refused(project, database, schema: str) -> None:
    (project.root / ".env.development").write_text(f"DATABASE_SCHEMA='{schema}'\n")
    before = _schemas(database)
    result = project.cli("migrate", "--env", "dev")
    assert result.code == 2
    _one_error_line(result.err)
    assert _schemas(database) == before


def test_hostile_schema_in_config_file_is_refused(project) -> None:
    (project.root / "momentry-db.toml").write_text('[environments]\nqa = { schema = "qa; drop schema public" }\n')
    result = project.cli("migrate", "--env", "qa")
    assert result.code == 2
    assert "momentry-db.toml" in _one_error_line(result.err)


def test_unknown_environment_lists_known_ones_and_writes_nothing(project, database) -> None:
    before = _schemas(database)
    result = project.cli("migrate", "--env", "devv")
    assert result.code == 2
    line = _one_error_line(result.err)
    assert "unknown environment 'devv'" in line and "known: prod, dev" in line
    assert _schemas(database) == before


def test_missing_explicit_env_file_is_an_error(project, database) -> None:
    result = project.cli("migrate", "--env", "dev", "--env-file", str(project.root / "nope.env"))
    assert result.code == 2
    assert "does not exist" in _one_error_line(result.err)
    assert "dev" not in _schemas(database)


def test_explicit_env_file_is_read(project, database, tmp_path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("DATABASE_SCHEMA=custom_dev\n")
    result = project.cli("migrate", "--env", "dev", "--env-file", str(env_file))
    assert result.code == 0, result.err
    assert "videos" in database.tables("custom_dev")


def test_json_error_shape(project) -> None:
    result = project.cli("status", "--env", "nope", "--json")
    assert result.code == 2
    import json

    body = json.loads(result.out)
    assert body["ok"] is False and body["error"]["exit_code"] == 2
    assert body["error"]["type"] == "ConfigError"


def test_unreachable_server_fails_fast_in_one_line_without_the_password(project, silent_server) -> None:
    port, accepted = silent_server
    url = f"postgres://momentry:s3cr3t-pw@127.0.0.1:{port}/momentry"
    result = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev",
                                 env={"DATABASE_URL": url})
    assert result.code == 2
    line = _one_error_line(result.err)
    # libpq's connect_timeout ended the wait (with none, libpq waits forever on a silent server)
    assert line == "error: postgres: cannot connect to postgresql+psycopg://momentry:***@127.0.0.1:" \
                   f"{port}/momentry: connection timeout expired"
    assert "s3cr3t-pw" not in result.err + result.out
    assert accepted, "the client never reached the server"


def test_connections_are_opened_with_the_5_second_connect_timeout() -> None:
    from sqlalchemy import event

    from momentry_db.stores.postgres import CONNECT_TIMEOUT_S, create_engine

    class Opened(Exception):
        pass

    engine = create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    params: dict = {}

    @event.listens_for(engine, "do_connect")
    def capture(dialect, record, cargs, cparams) -> None:
        params.update(cparams)
        raise Opened

    with pytest.raises(Opened):
        engine.connect()
    assert params["connect_timeout"] == CONNECT_TIMEOUT_S == 5


def test_refused_connection_is_reported_the_same_way(project) -> None:
    result = project.cli("status", "--env", "dev", "--database-url",
                         "postgresql://u:pw-in-url@127.0.0.1:1/db")
    assert result.code == 2
    line = _one_error_line(result.err)
    assert "pw-in-url" not in line and "u:***@127.0.0.1:1" in line


def test_help_lists_exit_codes(project) -> None:
    result = project.cli("--help")
    assert result.code == 0
    assert "Exit codes: 0 success; 1 a failure inside a store" in result.out
