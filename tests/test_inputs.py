"""Bad input everywhere: env files of other environments, broken revisions, URLs, option values,
malformed env files, client warnings, JSON usage errors, and clone's inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO

SAMPLE = "INSERT INTO {s}.videos (source_path) VALUES ('a.mp4'), ('b.mp4');"


def _schemas(database) -> set[str]:
    return {r[0] for r in database.query("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_%%' "
                                         "AND nspname <> 'information_schema'")}


def _catalog(database) -> set[tuple[str, str]]:
    """Every schema and every table in it: what a refused run must leave as it found."""
    rows = database.query("SELECT n.nspname, coalesce(c.relname, '') FROM pg_namespace n "
                          "LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'v', 'S') "
                          "WHERE n.nspname NOT LIKE 'pg_%%' AND n.nspname <> 'information_schema'")
    return set(rows)


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    assert "Traceback" not in text and "unexpected" not in text
    return lines[0]


def _scripts(project, tmp_path: Path) -> Path:
    """A copy of migrations/ that the project's alembic.ini points at."""
    scripts = tmp_path / "migrations"
    shutil.copytree(REPO / "migrations", scripts, ignore=shutil.ignore_patterns("__pycache__"))
    ini = project.root / "alembic.ini"
    ini.write_text(ini.read_text().replace(str(REPO / "migrations"), str(scripts)))
    return scripts


REVISION = '''"""{doc}"""
from alembic import op

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
{extra}

def upgrade() -> None:
    {body}


def downgrade() -> None:
    pass
'''


def _plant(scripts: Path, name: str, *, rev: str, down: str | None, body: str = "pass", extra: str = "") -> Path:
    path = scripts / "versions" / name
    path.write_text(REVISION.format(doc=name, rev=rev, down=down, body=body, extra=extra))
    return path


# --- 4. another environment's env file ------------------------------------------------------


def test_declared_env_file_that_resolves_to_prods_is_refused(project) -> None:
    (project.root / ".env").write_text("MOMENTRY_SERVER_PORT=3002\n")
    (project.root / "momentry-db.toml").write_text('[environments]\nstaging = { env_file = "./sub/../.env" }\n')
    result = project.cli("env-file", "--env", "staging")
    assert result.code == 2
    line = _one_error_line(result.err)
    assert "prod" in line and "staging" in line and "env_file" in line
    assert (project.root / ".env").read_text() == "MOMENTRY_SERVER_PORT=3002\n"


def test_declared_env_file_that_is_a_symlink_to_prods_is_refused(project) -> None:
    (project.root / ".env").write_text("MOMENTRY_SERVER_PORT=3002\n")
    (project.root / ".env.staging").symlink_to(project.root / ".env")
    (project.root / "momentry-db.toml").write_text('[environments]\nstaging = {}\n')
    result = project.cli("env-file", "--env", "staging")
    assert result.code == 2
    assert "would share the env file" in _one_error_line(result.err)
    assert (project.root / ".env").read_text() == "MOMENTRY_SERVER_PORT=3002\n"


def test_env_file_path_of_another_environment_is_refused(project) -> None:
    (project.root / ".env").write_text("MOMENTRY_SERVER_PORT=3002\n")
    result = project.momentry_db("env-file", "--env", "dev", "--path", ".env")  # relative to the project dir
    assert result.code == 2
    assert "--path '.env' is environment prod's env file" in _one_error_line(result.err)
    assert (project.root / ".env").read_text() == "MOMENTRY_SERVER_PORT=3002\n"
    assert not (project.root / ".env.development").exists()


def test_env_file_path_that_links_to_another_environments_file_is_refused(project, tmp_path: Path) -> None:
    (project.root / ".env.development").write_text("DATABASE_SCHEMA=dev\n")
    link = tmp_path / "elsewhere.env"
    link.symlink_to(project.root / ".env.development")
    result = project.cli("env-file", "--env", "prod", "--path", str(link))
    assert result.code == 2
    assert "environment dev's env file" in _one_error_line(result.err)
    assert (project.root / ".env.development").read_text() == "DATABASE_SCHEMA=dev\n"


def test_migrate_with_another_environments_env_file_is_refused(project, database) -> None:
    (project.root / ".env").write_text("MOMENTRY_SERVER_PORT=3002\nMOMENTRY_WORKER_ENABLED=true\n")
    before = _catalog(database)
    result = project.momentry_db("migrate", "--env", "dev", "--env-file", ".env")
    assert result.code == 2
    assert "--env-file '.env' is environment prod's env file" in _one_error_line(result.err)
    assert _catalog(database) == before


def test_an_environments_own_env_file_is_still_accepted(project) -> None:
    (project.root / "dev.env").write_text("MOMENTRY_SERVER_PORT=4003\n")
    result = project.cli("env-file", "--env", "dev", "--path", str(project.root / "dev.env"), "--check")
    assert result.code == 1, result.err  # differences reported, not refused
    assert "dev.env: DATABASE_SCHEMA: (missing) -> dev" in result.out.splitlines()
    assert "MOMENTRY_SERVER_PORT" not in result.out  # read from the file itself: in sync


# --- 9. broken revision histories ------------------------------------------------------------


@pytest.mark.parametrize("kind,extra,down,named", [
    ("NameError", "x = undefined_name", "0001", "0002_broken.py, line"),
    ("SyntaxError", "def (:", "0001", "0002_broken.py, line"),
    ("unknown down_revision", "", "9999", "0002_broken.py: down_revision '9999' is not a known revision"),
])
def test_a_revision_that_fails_to_load_exits_2_naming_the_file(project, database, tmp_path, kind, extra, down,
                                                                named) -> None:
    scripts = _scripts(project, tmp_path)
    _plant(scripts, "0002_broken.py", rev="0002", down=down, extra=extra)
    before = _catalog(database)
    result = project.cli("migrate", "--env", "dev")
    assert result.code == 2, result.err
    line = _one_error_line(result.err)
    assert named in line
    if kind != "unknown down_revision":
        assert kind in line
    assert _catalog(database) == before  # no dev schema, no history table


def test_a_revision_that_fails_to_load_stops_plain_alembic_too(project, database, tmp_path) -> None:
    scripts = _scripts(project, tmp_path)
    _plant(scripts, "0002_broken.py", rev="0002", down="0001", extra="x = undefined_name")
    before = _catalog(database)
    result = project.alembic("-x", "schema=dev", "upgrade", "head")
    assert result.code == 2
    assert "0002_broken.py" in result.err and "NameError" in result.err
    assert "Traceback" not in result.err
    assert _catalog(database) == before


@pytest.mark.parametrize("shape,second_down,message", [
    ("two bases", None, "has 2 bases"),
    ("two heads", "0001", "has 2 heads"),
])
def test_a_branched_history_exits_2_before_anything_is_created(project, database, tmp_path, shape, second_down,
                                                                message) -> None:
    scripts = _scripts(project, tmp_path)
    _plant(scripts, "0002_other.py", rev="0002", down=second_down)
    if shape == "two heads":
        _plant(scripts, "0003_other.py", rev="0003", down="0001")
    before = _catalog(database)
    for args in (["migrate", "--env", "dev"], ["migrate", "--env", "dev", "--env", "prod"], ["status", "--env", "dev"]):
        result = project.cli(*args)
        assert result.code == 2, (args, result.err)
        line = _one_error_line(result.err)
        assert message in line and "0002_other.py" in line
    assert _catalog(database) == before


# --- 9. connection URLs -----------------------------------------------------------------------


@pytest.mark.parametrize("variable,url,message", [
    ("DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:abc/db", "port 'abc' is not a number"),
    ("DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:{port},127.0.0.2:{port}/db", "names several hosts"),
    ("DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:{port}/db?sslmod=require", "unknown parameter 'sslmod'"),
    ("MONGODB_URL", "mongodb://u:hunter2@127.0.0.1:abc/", "port 'abc' is not a number"),
    ("MONGODB_URL", "mongodb://u:hunter2@127.0.0.1:{port}/?replicaSett=rs", "unknown parameter 'replicaSett'"),
    ("QDRANT_URL", "http://127.0.0.1:abc", "port 'abc' is not a number"),
    ("QDRANT_URL", "http://127.0.0.1:{port},127.0.0.2:{port}", "names several hosts"),
    ("QDRANT_URL", "http://127.0.0.1:{port}/?api_key=hunter2", "unknown parameter 'api_key'"),
    ("REDIS_URL", "redis://:hunter2@127.0.0.1:abc/0", "port 'abc' is not a number"),
    ("REDIS_URL", "redis://:hunter2@127.0.0.1:{port},127.0.0.2/0", "names several hosts"),
    ("REDIS_URL", "redis://:hunter2@127.0.0.1:{port}/0?sockettimeout=1", "unknown parameter 'sockettimeout'"),
])
def test_bad_urls_exit_2_with_one_line_before_connecting(project, database, silent_server, variable, url,
                                                         message) -> None:
    port, accepted = silent_server
    before = _catalog(database)
    result = project.cli("migrate", "--env", "dev", env={variable: url.format(port=port)})
    assert result.code == 2, result.err
    line = _one_error_line(result.err)
    assert variable in line and message in line
    assert "hunter2" not in result.err + result.out
    assert accepted == []
    assert _catalog(database) == before


def test_a_known_libpq_parameter_is_accepted(project, database) -> None:
    result = project.cli("migrate", "--env", "dev", "--store", "postgres",
                         env={"DATABASE_URL": database.url + ("&" if "?" in database.url else "?")
                              + "connect_timeout=3&application_name=x"})
    assert result.code == 0, result.err
    assert "dev" in _schemas(database)


# --- 9. option values -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["migrate", "--env", "dev", "--lock-timeout", "nan"],
    ["migrate", "--env", "dev", "--lock-timeout", "inf"],
    ["migrate", "--env", "dev", "--lock-timeout", "-1"],
    ["migrate", "--env", "dev", "--lock-timeout", "soon"],
    ["downgrade", "--env", "dev", "--to", "base", "--lock-timeout", "nan"],
    ["migrate", "--all", "--parallel", "0"],
    ["clone", "--from", "prod", "--to", "dev", "--limit", "-1"],
    ["history", "--env", "dev", "--limit", "-1"],
])
def test_bad_option_values_exit_2_and_create_nothing(project, database, args) -> None:
    before = _catalog(database)
    result = project.cli(*args)
    assert result.code == 2, result.err
    assert _catalog(database) == before
    as_json = project.cli(*args, "--json")
    assert as_json.code == 2
    doc = json.loads(as_json.out)
    assert doc["ok"] is False and doc["error"]["type"] == "UsageError" and doc["error"]["exit_code"] == 2
    assert _catalog(database) == before


def test_a_finite_lock_timeout_is_accepted(project, database) -> None:
    result = project.cli("migrate", "--env", "dev", "--store", "postgres", "--lock-timeout", "0.5")
    assert result.code == 0, result.err


# --- 9. malformed env files -------------------------------------------------------------------


def test_a_malformed_env_file_line_is_an_error_naming_file_and_line(project, database) -> None:
    (project.root / ".env.development").write_text("DATABASE_SCHEMA=dev\nthis is not a setting\n")
    before = _catalog(database)
    result = project.momentry_db("migrate", "--env", "dev")
    assert result.code == 2
    line = _one_error_line(result.err)
    assert ".env.development" in line and "line 2" in line
    assert "python-dotenv" not in result.err
    assert _catalog(database) == before


def test_an_unclosed_quote_in_an_explicit_env_file_is_an_error(project, database, tmp_path) -> None:
    env_file = tmp_path / "dev.env"
    env_file.write_text("MOMENTRY_SERVER_PORT=4003\nDATABASE_URL='postgresql://u:hunter2@h/db\n")
    result = project.momentry_db("status", "--env", "dev", "--env-file", str(env_file))
    assert result.code == 2
    line = _one_error_line(result.err)
    assert "dev.env" in line and "line 2" in line
    assert "hunter2" not in result.err


# --- 9. client warnings -----------------------------------------------------------------------


def test_client_warnings_become_one_line_notices(project) -> None:
    """pymongo warns about a DocumentDB host; the warning is a notice, not a raw warnings line."""
    url = "mongodb://u:hunter2@momentry-test.docdb.amazonaws.com:27017/"
    result = project.momentry_db("status", "--env", "dev", "--store", "mongo", env={"MONGODB_URL": url})
    assert "UserWarning" not in result.err and "warnings.warn" not in result.err
    notices = [line for line in result.err.splitlines() if line.startswith("warning: ")]
    assert len(notices) == 1, result.err
    assert "DocumentDB" in notices[0]
    assert "hunter2" not in result.err + result.out


# --- 9. usage errors as JSON ------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["adopt", "--json"], "Missing option '--env'."),
    (["migrate", "--json"], "give --env NAME (repeatable) or --all"),
    (["migrate", "--env", "dev", "--json", "--parallel", "x"], "Invalid value for '--parallel'"),
    (["status", "--env", "dev", "--json", "--no-such-flag"], "No such option '--no-such-flag'"),
])
def test_usage_errors_with_json_print_a_json_error_document(project, args, message) -> None:
    result = project.momentry_db(*args)
    assert result.code == 2
    doc = json.loads(result.out)
    assert set(doc) == {"version", "ok", "error"}
    assert doc["version"] == 2 and doc["ok"] is False
    assert doc["error"]["type"] == "UsageError" and doc["error"]["exit_code"] == 2
    assert doc["error"]["message"].startswith(message)
    assert "\n" not in doc["error"]["message"]


def test_usage_errors_without_json_keep_clicks_text(project) -> None:
    result = project.momentry_db("adopt")
    assert result.code == 2
    assert result.out == ""
    assert "Missing option '--env'" in result.err


# --- 11. clone --------------------------------------------------------------------------------


def test_process_wide_names_apply_to_the_clone_destination_only(migrated, database) -> None:
    database.execute(SAMPLE.format(s="public"))
    result = migrated.cli("clone", "--from", "prod", "--to", "dev", "--store", "postgres", "--json",
                          env={"DATABASE_SCHEMA": "dev"})
    assert result.code == 0, result.err
    assert json.loads(result.out)["copied"]["postgres"]["videos"] == 2
    assert database.query("SELECT source_path FROM dev.videos ORDER BY 1") == [("a.mp4",), ("b.mp4",)]


def test_clone_from_a_source_behind_the_destination_names_what_to_migrate(project, database, tmp_path) -> None:
    assert project.cli("migrate", "--env", "prod", "--store", "postgres").code == 0
    scripts = _scripts(project, tmp_path)
    _plant(scripts, "0002_more.py", rev="0002", down="0001",
           body="op.execute('CREATE TABLE extra (id int PRIMARY KEY)')")
    assert project.cli("migrate", "--env", "dev", "--store", "postgres").code == 0
    database.execute(SAMPLE.format(s="public"))
    database.execute("INSERT INTO dev.videos (source_path) VALUES ('kept.mp4')")
    result = project.cli("clone", "--from", "prod", "--to", "dev", "--store", "postgres")
    assert result.code == 1
    line = _one_error_line(result.err)
    assert line == ("error: postgres prod (schema public): clone failed: prod is at revision 0001, behind 0002; "
                    "run momentry-db migrate --env prod first, then clone again")
    assert database.query("SELECT source_path FROM dev.videos") == [("kept.mp4",)]


def test_a_bad_pg_timeout_names_the_option_and_the_variable(project, database) -> None:
    result = project.cli("migrate", "--env", "dev", "--pg-lock-timeout", "5sec")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "error: --pg-lock-timeout / MOMENTRY_PG_LOCK_TIMEOUT '5sec' is not a duration: use a number with ms, s, "
        "min or h (0 = none)"]
    assert database.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'dev'") == [(0,)]
