"""Environments, names and settings precedence: pure logic, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from momentry_db.environments import (NAME_KINDS, NameIndex, mask_url, names_clash, scrub, validate_collection, validate_env_name, validate_mongo_database,
                                      validate_pg_duration, validate_redis_prefix, validate_schema)
from momentry_db.errors import ConfigError
from momentry_db.settings import load_project, normalize_database_url, read_env_file


def project(tmp_path: Path, environ: dict[str, str] | None = None, toml: str | None = None):
    if toml is not None:
        (tmp_path / "momentry-db.toml").write_text(toml)
    return load_project(tmp_path, environ or {})


def test_prod_and_dev_use_the_seed_names(tmp_path: Path) -> None:
    prod = project(tmp_path).environment("prod")
    dev = project(tmp_path).environment("dev")
    assert (prod.schema, prod.mongo_database, prod.qdrant_collection, prod.redis_prefix) == (
        "public", "momentry", "momentry_rule1", "momentry:")
    assert (dev.schema, dev.mongo_database, dev.qdrant_collection, dev.redis_prefix) == (
        "dev", "momentry_dev", "momentry_dev_rule1", "momentry_dev:")
    assert (prod.server_port, prod.worker_enabled) == (3002, True)
    assert (dev.server_port, dev.worker_enabled) == (3003, False)
    assert prod.output_dir.name == "output" and dev.output_dir.name == "output_dev"
    assert prod.backup_dir.parts[-2:] == ("backup", "momentry")
    assert dev.backup_dir.parts[-2:] == ("backup", "momentry_dev")


def test_declared_environments_get_derived_names(tmp_path: Path) -> None:
    p = project(tmp_path, toml='[environments]\nstaging = {}\n"pr-42" = {}\nqa = { schema = "qa_one" }\n')
    assert p.registry.names == ("prod", "dev", "staging", "pr-42", "qa")
    pr = p.environment("pr-42")
    assert (pr.schema, pr.mongo_database, pr.qdrant_collection, pr.redis_prefix) == (
        "pr_42", "momentry_pr_42", "momentry_pr_42_rule1", "momentry_pr_42:")
    assert p.environment("qa").schema == "qa_one"
    assert p.environment("staging").env_file is None  # .env.staging is optional


def test_extra_envs_come_from_the_process_environment(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "pr-7, staging ,dev"})
    assert p.registry.names == ("prod", "dev", "pr-7", "staging")
    assert p.environment("pr-7").schema == "pr_7"


def test_unknown_environment_lists_the_known_ones(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "staging"})
    with pytest.raises(ConfigError, match=r"unknown environment 'stagin'; known: prod, dev, staging"):
        p.environment("stagin")


MALFORMED = r"invalid schema name .*: a schema is \[a-z_\]\[a-z0-9_\]\* \(lowercase, unquoted\)$"


@pytest.mark.parametrize("name, message", [
    ("dev; drop schema public", MALFORMED), ('"dev"', MALFORMED), ("Dev", MALFORMED), ("", MALFORMED),
    ("dev-x", MALFORMED), ("9dev", MALFORMED),
    ("a" * 64, "longer than PostgreSQL's 63 bytes"),
    ("pg_temp", "schema 'pg_temp' is reserved by PostgreSQL"),
    ("information_schema", "schema 'information_schema' is reserved by PostgreSQL"),
    ("public", "schema 'public' belongs to prod: another environment may not use it"),
])
def test_hostile_or_malformed_schema_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_schema(name, primary=False)


def test_a_63_byte_schema_is_accepted() -> None:
    assert validate_schema("a" * 63, primary=False) == "a" * 63


def test_prod_schema_must_be_public(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prod's schema must be 'public'"):
        project(tmp_path, {"DATABASE_SCHEMA": "dev"}).environment("prod")


@pytest.mark.parametrize("var,value", [("DATABASE_SCHEMA", "public"), ("MONGODB_DATABASE", "momentry"),
                                       ("QDRANT_COLLECTION", "momentry_rule1"),
                                       ("MOMENTRY_REDIS_PREFIX", "momentry:")])
def test_dev_can_never_be_pointed_at_prod_names(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{value}' (reaches environment prod's|belongs to prod)"):
        project(tmp_path, {var: value}).environment("dev")


@pytest.mark.parametrize("var,value", [("QDRANT_COLLECTION", "momentry_rule1__bfa460f7"),
                                       ("MOMENTRY_REDIS_PREFIX", "momentry:cache:")])
def test_names_that_reach_into_prod_are_refused(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError, match="reaches environment prod's"):
        project(tmp_path, {var: value}).environment("dev")


@pytest.mark.parametrize("toml", ['[environments]\nfoo = { prefix = "momentry:cache:" }\n',
                                  '[environments]\nfoo = { env_file = ".env" }\n',
                                  '[environments]\nfoo = { collection = "momentry_dev_rule1__x" }\n'])
def test_declared_names_that_overlap_another_environment_are_refused(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError, match="would share the"):
        project(tmp_path, toml=toml)


def test_declared_env_may_not_take_another_envs_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="would share the schema 'dev'"):
        project(tmp_path, toml='[environments]\nstaging = { schema = "dev" }\n')


@pytest.mark.parametrize("toml,message", [
    ('[environments]\nstaging = { colour = "red" }\n', "unknown key 'colour'"),
    ('[environments]\nstaging = { schema = 3 }\n', "schema must be a str"),
    ('[environments]\n"Stage" = {}\n', "invalid environment name"),
    ('[environments]\nprod = {}\n', "prod is built in"),
    ('[environments\n', "not valid TOML"),
])
def test_bad_config_file_names_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        project(tmp_path, toml=toml)


def test_precedence_option_over_environment_over_file_over_default(tmp_path: Path) -> None:
    (tmp_path / ".env.development").write_text(
        "DATABASE_URL=postgres://file@h/db\nMONGODB_DATABASE=momentry_dev_file\nQDRANT_COLLECTION=from_file\n")
    environ = {"DATABASE_URL": "postgres://proc@h/db", "QDRANT_COLLECTION": "from_process"}
    p = project(tmp_path, environ)
    dev = p.environment("dev")
    assert dev.database_url.reveal() == "postgresql+psycopg://proc@h/db"
    assert dev.mongo_database == "momentry_dev_file"
    assert dev.qdrant_collection == "from_process"
    assert dev.redis_prefix == "momentry_dev:"
    dev = p.environment("dev", overrides={"DATABASE_URL": "postgresql://opt@h/db"})
    assert dev.database_url.reveal() == "postgresql+psycopg://opt@h/db"


def test_prod_reads_dot_env_and_dev_reads_dot_env_development(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL=postgres://prod@h/db\n")
    (tmp_path / ".env.development").write_text("DATABASE_URL=postgres://dev@h/db\n")
    p = project(tmp_path)
    assert p.environment("prod").database_url.reveal().startswith("postgresql+psycopg://prod@")
    assert p.environment("dev").database_url.reveal().startswith("postgresql+psycopg://dev@")


def test_explicit_env_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        project(tmp_path).environment("dev", env_file=tmp_path / "missing.env")


@pytest.mark.parametrize("url", ["postgres://u@localhost:5432/momentry", "postgresql://u@localhost/m",
                                 "postgresql+psycopg://u@localhost/m"])
def test_database_url_forms(url: str) -> None:
    assert normalize_database_url(url).startswith("postgresql+psycopg://u@localhost")


def test_non_postgres_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        normalize_database_url("mysql://root:hunter2@localhost/db")
    assert str(info.value) == ("DATABASE_URL 'mysql://root:***@localhost/db' is not a PostgreSQL URL; "
                               "use postgres://, postgresql:// or postgresql+psycopg://")


def test_secrets_are_masked_in_repr_and_scrubbed_from_messages(tmp_path: Path) -> None:
    dev = project(tmp_path, {"DATABASE_URL": "postgres://u:hunter2@h/db", "QDRANT_API_KEY": "k-123456"}
                  ).environment("dev")
    assert "hunter2" not in repr(dev) and "k-123456" not in repr(dev)
    assert dev.database_url.masked == "postgresql+psycopg://u:***@h/db"
    assert scrub("failed for hunter2 with k-123456", dev.secrets()) == "failed for *** with ***"
    assert mask_url("mongodb://a:b@h1,h2/x") == "mongodb://a:***@h1,h2/x"


def test_a_password_given_as_a_url_parameter_is_masked(tmp_path: Path) -> None:
    dev = project(tmp_path, {"DATABASE_URL": "postgresql://app@db:5432/m?sslmode=require&password=s3cretQ"}
                  ).environment("dev")
    assert "s3cretQ" not in dev.database_url.masked and "password=***" in dev.database_url.masked
    assert dev.secrets() == ["s3cretQ", dev.database_url]
    assert "s3cretQ" not in scrub("connect to postgresql://app@db/m?password=s3cretQ failed", [])


# --- validators, table-driven in both directions ---------------------------------------------

@pytest.mark.parametrize("name, valid", [
    ("dev", True), ("pr-42", True), ("a", True), ("staging_2", True), ("a1-b2_c3", True), ("a" * 40, True),
    ("1dev", False), ("9", False), ("-dev", False), ("_dev", False), ("Dev", False), ("dev-", False),
    ("dev--x", False), ("dev x", False), ("dev.x", False), ("", False), ("a" * 41, False), ("dév", False),
])
def test_environment_names(name: str, valid: bool) -> None:
    if valid:
        assert validate_env_name(name) == name
    else:
        with pytest.raises(ConfigError, match=r"invalid environment name .*starting with a letter"):
            validate_env_name(name)


@pytest.mark.parametrize("validate, value, valid", [
    (validate_mongo_database, "momentry_dev", True), (validate_mongo_database, "_x9", True),
    (validate_mongo_database, "a" * 63, True),
    (validate_mongo_database, "9db", False), (validate_mongo_database, "Db", False),
    (validate_mongo_database, "a-b", False), (validate_mongo_database, "a" * 64, False),
    (validate_mongo_database, "admin", False), (validate_mongo_database, "local", False),
    (validate_collection, "momentry_dev_rule1", True), (validate_collection, "a-b_c", True),
    (validate_collection, "a" * 255, True),
    (validate_collection, "1c", False), (validate_collection, "C", False), (validate_collection, "a.b", False),
    (validate_collection, "a" * 256, False),
    (validate_redis_prefix, "momentry_dev:", True), (validate_redis_prefix, "a.b-c:d:", True),
    (validate_redis_prefix, "a" * 127 + ":", True),
    (validate_redis_prefix, "momentry_dev", False), (validate_redis_prefix, "m*:", False),
    (validate_redis_prefix, "1m:", False), (validate_redis_prefix, "M:", False),
    (validate_redis_prefix, "a" * 128 + ":", False),
])
def test_store_names(validate, value: str, valid: bool) -> None:
    if valid:
        assert validate(value) == value
    else:
        with pytest.raises(ConfigError, match=r"invalid|reserved"):
            validate(value)


@pytest.mark.parametrize("value, valid", [("0", True), ("250ms", True), ("5s", True), ("2min", True), ("1h", True),
                                          ("5 s", False), ("s", False), ("-1s", False), ("1d", False),
                                          ("1.5s", False), ("", False)])
def test_postgres_durations(value: str, valid: bool) -> None:
    if valid:
        assert validate_pg_duration(value, "--pg-lock-timeout") == value
    else:
        with pytest.raises(ConfigError, match=r"--pg-lock-timeout .* is not a duration"):
            validate_pg_duration(value, "--pg-lock-timeout")


# scrub: a password is masked by structure even when it was never known; the rest of the text stays.
@pytest.mark.parametrize("text, masked", [
    ("connect to postgresql://app:hunter2@db:5432/m failed", "connect to postgresql://app:***@db:5432/m failed"),
    ("mongodb://root:pw@h1,h2/x?authSource=admin", "mongodb://root:***@h1,h2/x?authSource=admin"),
    ("redis://:r3dis@127.0.0.1:6379/0 refused", "redis://:***@127.0.0.1:6379/0 refused"),
    ("postgresql://app@db/m?sslmode=require&password=s3cret", "postgresql://app@db/m?sslmode=require&password=***"),
    ("host=db user=app password=s3cret dbname=m", "host=db user=app password=*** dbname=m"),
    ("postgresql://app@db:5432/m has no password", "postgresql://app@db:5432/m has no password"),
    ("nothing secret here", "nothing secret here"),
])
def test_scrub_masks_passwords_it_was_never_told(text: str, masked: str) -> None:
    assert scrub(text, []) == masked


def test_scrub_replaces_known_secrets_but_not_short_ones() -> None:
    assert scrub("key k-123456 and pin 123", ["k-123456", "123"]) == "key *** and pin 123"


@pytest.mark.parametrize("given, normalized", [
    ("postgres://u:p@ss@host/db", "postgresql+psycopg://u:p%40ss@host/db"),
    ("postgres://u:a@evil:5432/x@host/db", "postgresql+psycopg://u:a%40evil%3A5432%2Fx@host/db"),
    ("postgres://u:p?q#r@host/db", "postgresql+psycopg://u:p%3Fq%23r@host/db"),
    ("postgres://u:p:q@host/db", "postgresql+psycopg://u:p%3Aq@host/db"),
    ("postgres://u/x:p@host/db", "postgresql+psycopg://u%2Fx:p@host/db"),
    ("postgres://u:p/x@host:5432/db?sslmode=require", "postgresql+psycopg://u:p%2Fx@host:5432/db?sslmode=require"),
    ("postgres://u@host/db", "postgresql+psycopg://u@host/db"),
    ("postgres://host/db", "postgresql+psycopg://host/db"),
])
def test_delimiters_in_the_user_info_are_encoded(given: str, normalized: str) -> None:
    assert normalize_database_url(given) == normalized


def test_env_file_errors_name_the_file_the_line_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^env file '{tmp_path}' cannot be read: \[Errno 21\] Is a directory"):
        read_env_file(tmp_path)
    (tmp_path / "bad.env").write_text('A=1\nB="unclosed\n')
    with pytest.raises(ConfigError) as info:
        read_env_file(tmp_path / "bad.env")
    assert str(info.value) == (f"env file '{tmp_path / 'bad.env'}', line 2: cannot be parsed; write KEY=value, "
                               "quoting values with spaces or '#' and closing every quote")
    (tmp_path / "latin1.env").write_bytes(b"A=\xe9\n")
    with pytest.raises(ConfigError, match=rf"^env file '{tmp_path / 'latin1.env'}' cannot be read: 'utf-8' codec"):
        read_env_file(tmp_path / "latin1.env")
    (tmp_path / "utf8.env").write_text("A=é\nB='x y'\n", encoding="utf-8")
    assert read_env_file(tmp_path / "utf8.env") == {"A": "é", "B": "x y"}


def test_an_invalid_environment_name_is_named_with_the_rule() -> None:
    with pytest.raises(ConfigError) as info:
        validate_env_name("1dev")
    assert str(info.value) == ("invalid environment name '1dev': use lowercase letters, digits, '-' or '_' "
                               "(at most 40 characters, starting with a letter)")


def test_the_other_environments_ignore_this_processes_isolation_variables(tmp_path: Path) -> None:
    p = project(tmp_path, {"MONGODB_DATABASE": "mine"})
    assert p.environment("dev").mongo_database == "mine"
    assert [e.mongo_database for e in p.environments()] == ["momentry", "momentry_dev"]


# check_url: each setting's host list, port and parameters, accepted or refused with the masked URL.
@pytest.mark.parametrize("variable, url, refusal", [
    ("MONGODB_URL", "mongodb://u:pw@h1:27017,h2:27017/?replicaSet=rs", None),
    ("DATABASE_URL", "postgresql://u:pw@h/db?sslmode=&application_name=x", None),
    ("REDIS_URL", "redis://:pw@h/0?socket_timeout=1", None),
    ("QDRANT_URL", "http://h:6333", None),
    ("DATABASE_URL", "postgresql://u:pw@h1:5432,h2:5432/db",
     "DATABASE_URL 'postgresql://u:***@h1:5432,h2:5432/db' names several hosts; give one host and port"),
    ("REDIS_URL", "mongodb://u:pw@h1,h2/", "REDIS_URL 'mongodb://u:***@h1,h2/' names several hosts; give one host and port"),
    ("DATABASE_URL", "postgresql://u:pw@h:54x/db",
     "DATABASE_URL 'postgresql://u:***@h:54x/db': port '54x' is not a number between 0 and 65535"),
    ("DATABASE_URL", "postgresql://u:pw@h:99999/db",
     "DATABASE_URL 'postgresql://u:***@h:99999/db': port '99999' is not a number between 0 and 65535"),
    ("DATABASE_URL", "postgresql://u:pw@h/db?sslmode",
     "DATABASE_URL 'postgresql://u:***@h/db?sslmode': the query string cannot be parsed; write ?name=value&name=value"),
    ("QDRANT_URL", "http://h:6333/?api_key=k", "QDRANT_URL 'http://h:6333/?api_key=***': unknown parameter 'api_key'; "
                                               "a Qdrant URL takes none (put the API key in QDRANT_API_KEY)"),
    ("REDIS_URL", "redis://:pw@h/0?sockettimeout=1", "REDIS_URL 'redis://:***@h/0?sockettimeout=1': unknown parameter "
                                                     "'sockettimeout'; remove it or use one redis-py knows"),
    ("DATABASE_URL", "postgresql://u:pw@h/db?sslmod=x", "DATABASE_URL 'postgresql://u:***@h/db?sslmod=x': unknown "
                                                        "parameter 'sslmod'; remove it or use one libpq knows"),
    ("MONGODB_URL", "mongodb://u:pw@h/?replicaSett=x", "MONGODB_URL 'mongodb://u:***@h/?replicaSett=x': unknown "
                                                       "parameter 'replicaSett'; remove it or use one pymongo knows"),
])
def test_connection_urls_are_checked_before_anything_connects(variable: str, url: str, refusal: str | None) -> None:
    from momentry_db.settings import check_url

    if refusal is None:
        assert check_url(variable, url) == url
    else:
        with pytest.raises(ConfigError) as info:
            check_url(variable, url)
        assert str(info.value) == refusal


CHECK = "check DATABASE_SCHEMA / MONGODB_DATABASE / QDRANT_COLLECTION / MOMENTRY_REDIS_PREFIX for staging"


@pytest.mark.parametrize("setting, refusal", [
    ("DATABASE_SCHEMA=dev", f"staging's schema 'dev' reaches environment dev's 'dev'; {CHECK}"),
    ("MONGODB_DATABASE=momentry_dev",
     f"staging's MongoDB database 'momentry_dev' reaches environment dev's 'momentry_dev'; {CHECK}"),
    ("DATABASE_SCHEMA=staging_x", None),
])
def test_a_declared_environment_may_not_take_another_environments_names(tmp_path: Path, setting: str,
                                                                       refusal: str | None) -> None:
    (tmp_path / ".env.staging").write_text(setting + "\n")
    p = project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "staging"})
    if refusal is None:
        assert p.environment("staging").schema == "staging_x"
    else:
        with pytest.raises(ConfigError) as info:
            p.environment("staging")
        assert str(info.value) == refusal


def test_an_env_file_option_is_checked_and_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MONGODB_DATABASE=momentry\n")
    with pytest.raises(ConfigError) as info:
        project(tmp_path).environment("dev", env_file=tmp_path / ".env")
    assert str(info.value) == (f"--env-file '{tmp_path / '.env'}' is environment prod's env file; give dev its own "
                               "file (such as .env.development)")
    with pytest.raises(ConfigError) as missing:
        project(tmp_path).environment("dev", env_file=tmp_path / "nope.env")
    assert str(missing.value) == f"env file '{tmp_path / 'nope.env'}' does not exist"
    (tmp_path / "empty.env").write_text("")
    (tmp_path / "blank.env").write_text("MONGODB_DATABASE=\n")
    (tmp_path / "mine.env").write_text("MONGODB_DATABASE=momentry_mine\n")
    assert [project(tmp_path).environment("dev", env_file=tmp_path / f).mongo_database
            for f in ("empty.env", "blank.env", "mine.env")] == ["momentry_dev", "momentry_dev", "momentry_mine"]


# userinfo_end: the '@' that ends the user info is the first after which the rest reads as a location.
@pytest.mark.parametrize("rest, end", [
    ("h/db", -1),
    ("u:p@h/db", 3),
    ("u:p@ss@h/db", 6),
    ("u:a@b/c@h/db", 7),
    ("u:p@x#y@h/db", 7),
    ("u:p@h:5x@h2:5432/db", 8),
    ("u:p@h:1,x:y@h2/db", 11),
    ("u:p@h1:1,h2:2/db", 3),
    ("u:p@h1:1,h2:2/db?application_name=me@x", 3),
    ("u:p@h:5x/db?application_name=me@x", 31),
    ("u:p@h/db?application_name=me@x", 3),
    ("u:p@h/db?a=&b=me@x", 3),
    ("u:p@h/db?bad&b=me@x", 17),
    ("u:p@h?a=1@h2/db", 3),
    ("u:p@h?bad@h2/db", 9),
    ("u:p@h/db#frag?me@x", 16),
    ("u:p@h/db?x=1#f@g", 14),
    ("u:p@h#f/me@x", 10),
    ("u:p@h/a/b@x", 9),
])
def test_where_the_user_info_ends(rest: str, end: int) -> None:
    from momentry_db.environments import userinfo_end

    assert userinfo_end(rest) == end


@pytest.mark.parametrize("secret, variants", [
    ('a"b\\c d/e', ['a"b\\c d/e', 'a\\"b\\\\c d/e', 'a"b\\\\c d/e']),  # as given, JSON-escaped, repr-escaped
    ("p@ss w0rd", ["p@ss w0rd", "w0rd"]),  # and the pieces of four characters or more
    ("s3cr%40x", ["s3cr%40x", "s3cr@x", "s3cr"]),  # percent-decoded
    ("abcd", ["abcd"]),
    ("abc", []),  # too short to replace everywhere: masked by structure only
])
def test_the_forms_a_secret_may_be_printed_in(secret: str, variants: list[str]) -> None:
    from momentry_db.environments import secret_variants

    assert secret_variants(secret) == variants


@pytest.mark.parametrize("value, parts", [
    ("postgresql://u:pw@h/db", ["pw"]),
    ("postgresql://u@h/db", []),
    ("postgresql://u:@h/db", []),
    ("postgresql://u/x@h/db", ["u/x"]),  # a user info with a delimiter and no ':' may be a password
    ("postgresql://u:pw@h/db?password=p2&sslpassword=p3", ["pw", "p2", "p3"]),
    ("host=h password=s3cr user=u", ["s3cr"]),
    ("host=h user=u", []),
    ("host=h password='a b' sslpassword=zz", ["a b", "zz", "'a b'"]),
])
def test_the_secrets_inside_a_connection_string(value: str, parts: list[str]) -> None:
    from momentry_db.environments import secret_parts

    assert secret_parts(value) == parts


@pytest.mark.parametrize("url, masked", [
    ("postgresql://user:pw@h/db", "postgresql://user:***@h/db"),
    ("postgresql://a:b:c@h/db", "postgresql://a:***@h/db"),
    ("postgresql://us/er:pw@h/db", "postgresql://***@h/db"),  # a user name with a delimiter is hidden whole
    ("postgresql://us/er@h/db", "postgresql://***@h/db"),
    ("postgresql://user@h/db", "postgresql://user@h/db"),
])
def test_mask_url_user_info(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_scrub_replaces_the_longest_known_secret_first() -> None:
    from momentry_db.environments import SecretURL

    assert scrub("abcdef abcd", ["abcd", "abcdef"]) == "*** ***"
    assert scrub("to postgresql://u:longpass@h/db", [SecretURL("postgresql://u:longpass@h/db")]) == \
        "to postgresql://u:***@h/db"


def test_every_setting_is_resolved_from_its_own_variable(tmp_path: Path) -> None:
    environ = {"MOMENTRY_DATA_ROOT": "/srv/m", "MOMENTRY_SERVER_PORT": "4000", "MOMENTRY_WORKER_ENABLED": "TRUE",
               "MOMENTRY_PG_LOCK_TIMEOUT": "2s", "MOMENTRY_PG_STATEMENT_TIMEOUT": "1h", "QDRANT_URL": "https://q:6333",
               "REDIS_URL": "redis://:pw@r:6379/1", "MONGODB_URL": "mongodb://u:pw@m:27017/"}
    dev = project(tmp_path, environ).environment("dev")
    assert (dev.output_dir, dev.backup_dir) == (Path("/srv/m/output_dev"), Path("/srv/m/backup/momentry_dev"))
    assert (dev.server_port, dev.worker_enabled, dev.pg_lock_timeout, dev.pg_statement_timeout) == (4000, True, "2s", "1h")
    assert (dev.qdrant_url.value, dev.redis_url.value, dev.mongodb_url.value, dev.qdrant_api_key) == (
        "https://q:6333", "redis://:pw@r:6379/1", "mongodb://u:pw@m:27017/", None)
    defaults = project(tmp_path).environment("dev")
    assert (defaults.server_port, defaults.worker_enabled, defaults.pg_lock_timeout, defaults.pg_statement_timeout,
            defaults.qdrant_url, defaults.qdrant_api_key) == (3003, False, "5s", "30min", None, None)
    prod = project(tmp_path).environment("prod")
    assert (prod.server_port, prod.worker_enabled) == (3002, True)
    assert project(tmp_path, {"MOMENTRY_WORKER_ENABLED": "off", "MOMENTRY_OUTPUT_DIR": "/o"}
                   ).environment("prod").worker_enabled is False
    assert project(tmp_path, {"MOMENTRY_OUTPUT_DIR": "/o"}).environment("prod").output_dir == Path("/o")


@pytest.mark.parametrize("environ, refusal", [
    ({"MOMENTRY_SERVER_PORT": "x"}, "MOMENTRY_SERVER_PORT must be a number, not 'x'"),
    ({"MOMENTRY_SERVER_PORT": "70000"}, "dev's server port 70000 is not between 1 and 65535"),
    ({"MOMENTRY_PG_LOCK_TIMEOUT": "soon"}, "--pg-lock-timeout / MOMENTRY_PG_LOCK_TIMEOUT 'soon' is not a duration: "
                                           "use a number with ms, s, min or h (0 = none)"),
    ({"MOMENTRY_PG_STATEMENT_TIMEOUT": "soon"}, "--pg-statement-timeout / MOMENTRY_PG_STATEMENT_TIMEOUT 'soon' is not "
                                                "a duration: use a number with ms, s, min or h (0 = none)"),
    ({"QDRANT_URL": "http://q/?x=1"}, "QDRANT_URL 'http://q/?x=1': unknown parameter 'x'; a Qdrant URL takes none "
                                      "(put the API key in QDRANT_API_KEY)"),
    ({"REDIS_URL": "redis://r/0?x=1"}, "REDIS_URL 'redis://r/0?x=1': unknown parameter 'x'; remove it or use one "
                                       "redis-py knows"),
])
def test_a_bad_setting_is_refused_naming_its_variable(tmp_path: Path, environ: dict[str, str], refusal: str) -> None:
    with pytest.raises(ConfigError) as info:
        project(tmp_path, environ).environment("dev")
    assert str(info.value) == refusal


# --- settings resolution: each branch of load_project and Project.environment, both ways ---------

def test_an_environment_records_the_env_file_it_read_even_when_empty(tmp_path: Path) -> None:
    assert project(tmp_path).environment("dev").env_file is None
    (tmp_path / ".env.development").write_text("")
    assert project(tmp_path).environment("dev").env_file == tmp_path / ".env.development"
    (tmp_path / ".env.development").write_text("MONGODB_DATABASE=momentry_dev_file\n")
    dev = project(tmp_path).environment("dev")
    assert (dev.env_file, dev.mongo_database) == (tmp_path / ".env.development", "momentry_dev_file")


def test_an_empty_setting_falls_through_to_the_next_source(tmp_path: Path) -> None:
    (tmp_path / ".env.development").write_text("MONGODB_DATABASE=momentry_dev_file\nQDRANT_COLLECTION=\n")
    p = project(tmp_path, {"MONGODB_DATABASE": "", "QDRANT_COLLECTION": "momentry_dev_proc"})
    assert p.environment("dev").mongo_database == "momentry_dev_file"
    dev = p.environment("dev", overrides={"QDRANT_COLLECTION": "", "MONGODB_DATABASE": None})
    assert (dev.qdrant_collection, dev.mongo_database) == ("momentry_dev_proc", "momentry_dev_file")
    assert p.environment("dev", overrides={"QDRANT_COLLECTION": "momentry_dev_opt"}).qdrant_collection == \
        "momentry_dev_opt"


def test_every_environment_at_once_still_reads_the_process_connection_settings(tmp_path: Path) -> None:
    p = project(tmp_path, {"DATABASE_URL": "postgres://u@h/db", "DATABASE_SCHEMA": "dev_mine",
                           "MOMENTRY_SERVER_PORT": "4100"})
    assert [(e.name, e.schema, e.server_port, e.database_url.reveal()) for e in p.environments()] == [
        ("prod", "public", 3002, "postgresql+psycopg://u@h/db"), ("dev", "dev", 3003, "postgresql+psycopg://u@h/db")]
    dev = p.environment("dev")
    assert (dev.schema, dev.server_port) == ("dev_mine", 4100)


def test_the_data_root_defaults_to_momentry_in_the_home_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dev = project(tmp_path).environment("dev")
    assert (dev.output_dir, dev.backup_dir) == (tmp_path / "home/momentry/output_dev",
                                                tmp_path / "home/momentry/backup/momentry_dev")
    prod = project(tmp_path, {"MOMENTRY_DATA_ROOT": "~/data"}).environment("prod")
    assert (prod.output_dir, prod.backup_dir) == (tmp_path / "home/data/output", tmp_path / "home/data/backup/momentry")
    dev = project(tmp_path, {"MOMENTRY_BACKUP_DIR": "/b", "MOMENTRY_OUTPUT_DIR": "/o"}).environment("dev")
    assert (dev.output_dir, dev.backup_dir) == (Path("/o"), Path("/b"))


@pytest.mark.parametrize("text, port", [("1", 1), ("65535", 65535), ("3100", 3100), ("0", None), ("65536", None),
                                        ("-1", None)])
def test_the_server_port_is_between_1_and_65535(tmp_path: Path, text: str, port: int | None) -> None:
    p = project(tmp_path, {"MOMENTRY_SERVER_PORT": text})
    if port is not None:
        assert p.environment("dev").server_port == port
    else:
        with pytest.raises(ConfigError, match=rf"^dev's server port {text} is not between 1 and 65535$"):
            p.environment("dev")


def test_a_declared_environment_has_no_port_unless_it_declares_one(tmp_path: Path) -> None:
    p = project(tmp_path, toml='[environments]\nstaging = {}\nqa = { port = 4200 }\n')
    assert [(e.name, e.server_port) for e in p.environments()] == [
        ("prod", 3002), ("dev", 3003), ("staging", None), ("qa", 4200)]


@pytest.mark.parametrize("value, enabled", [
    ("1", True), ("true", True), ("yes", True), ("on", True), (" Yes ", True), ("ON", True), ("True", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("enabled", False), ("2", False),
])
def test_the_worker_switch_reads_the_usual_words_for_on(tmp_path: Path, value: str, enabled: bool) -> None:
    p = project(tmp_path, {"MOMENTRY_WORKER_ENABLED": value})
    assert (p.environment("dev").worker_enabled, p.environment("prod").worker_enabled) == (enabled, enabled)


def test_an_environment_knows_whether_it_is_prod_and_where_its_state_lives(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_STATE_DIR": "state"})
    prod, dev = p.environments()
    assert (prod.primary, dev.primary) == (True, False)
    assert (prod.root, dev.root) == ("momentry", "momentry_dev")
    assert (prod.state_dir, dev.state_dir) == (tmp_path / "state", tmp_path / "state")
    assert project(tmp_path).environment("dev").state_dir == tmp_path / ".momentry"
    assert project(tmp_path, {"MOMENTRY_STATE_DIR": "/srv/state"}).environment("dev").state_dir == Path("/srv/state")


def test_the_api_key_and_urls_are_kept_as_secrets(tmp_path: Path) -> None:
    dev = project(tmp_path, {"QDRANT_API_KEY": "k-123456", "DATABASE_URL": "postgresql://u:pw@h/db"}
                  ).environment("dev")
    assert (dev.qdrant_api_key.reveal(), str(dev.qdrant_api_key)) == ("k-123456", "***")
    assert (dev.database_url.reveal(), dev.database_url.masked) == ("postgresql+psycopg://u:pw@h/db",
                                                                    "postgresql+psycopg://u:***@h/db")
    bare = project(tmp_path).environment("dev")
    assert (bare.database_url, bare.mongodb_url, bare.redis_url, bare.qdrant_api_key) == (None, None, None, None)


@pytest.mark.parametrize("value, embedded", [(None, True), ("on", True), ("ON", True), (" on ", True),
                                             ("off", False), ("OFF", False), ("Off ", False)])
def test_the_embedded_switch_is_on_or_off(tmp_path: Path, value: str | None, embedded: bool) -> None:
    p = project(tmp_path, {} if value is None else {"MOMENTRY_EMBEDDED": value})
    assert (p.embedded, p.environment("dev").embedded) == (embedded, embedded)


@pytest.mark.parametrize("value", ["yes", "0", "of"])
def test_any_other_embedded_switch_is_refused_naming_what_off_does(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        project(tmp_path, {"MOMENTRY_EMBEDDED": value})
    assert str(info.value) == (f"MOMENTRY_EMBEDDED must be on or off, not {value!r}; off disables the embedded "
                               "PostgreSQL and MongoDB servers")


@pytest.mark.parametrize("ini, scripts", [
    (None, None),
    ("[alembic]\nscript_location = %(here)s/db/migrations\n", "{root}/db/migrations"),
    ("[alembic]\nscript_location = migrations\n", "{root}/migrations"),
    ("[alembic]\nscript_location = /opt/app/migrations\n", "/opt/app/migrations"),
    ("[alembic]\nscript_location =\n", None),
    ("[alembic]\nsqlalchemy.url = postgresql://h/db\n", None),
    ("[loggers]\nkeys = root\n", None),
])
def test_the_migrations_folder_is_the_one_alembic_ini_names(tmp_path: Path, ini: str | None,
                                                           scripts: str | None) -> None:
    if ini is not None:
        (tmp_path / "alembic.ini").write_text(ini)
    expected = None if scripts is None else Path(scripts.format(root=tmp_path))
    assert project(tmp_path).alembic_scripts == expected


def test_an_alembic_ini_that_cannot_be_read_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "alembic.ini").write_text("script_location = migrations\n")
    with pytest.raises(ConfigError, match=r"^alembic\.ini: cannot be read \(File contains no section headers\."):
        project(tmp_path)
    (tmp_path / "alembic.ini").unlink()
    (tmp_path / "alembic.ini").mkdir()
    assert project(tmp_path).alembic_scripts is None  # not a file: no alembic.ini


def test_the_project_directory_comes_from_the_argument_the_environment_or_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "b")
    assert load_project(None, {}).root == tmp_path / "b"
    assert load_project(None, {"MOMENTRY_PROJECT_DIR": str(tmp_path / "link")}).root == tmp_path / "a"
    assert load_project(tmp_path / "b", {"MOMENTRY_PROJECT_DIR": str(tmp_path / "a")}).root == tmp_path / "b"
    assert load_project(Path("../a"), {}).root == tmp_path / "a"
    with pytest.raises(ConfigError) as info:
        load_project(None, {"MOMENTRY_PROJECT_DIR": str(tmp_path / "missing")})
    assert str(info.value) == f"project directory {str(tmp_path / 'missing')!r} does not exist"


def test_extra_environments_are_checked_and_named_once(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_EXTRA_ENVS": ",qa,, qa ,dev,pr-1,prod,staging"},
                toml='[environments]\nstaging = {}\n')
    assert p.registry.names == ("prod", "dev", "staging", "qa", "pr-1")
    assert [s.source for s in p.registry.specs] == [
        "built in", "built in", "momentry-db.toml [environments.staging]", "MOMENTRY_EXTRA_ENVS", "MOMENTRY_EXTRA_ENVS"]
    with pytest.raises(ConfigError) as info:
        project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "qa,Bad"})
    assert str(info.value) == ("MOMENTRY_EXTRA_ENVS: invalid environment name 'Bad': use lowercase letters, digits, "
                               "'-' or '_' (at most 40 characters, starting with a letter)")


def test_the_isolation_names_set_in_the_process_are_listed_in_order(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_SERVER_PORT": "4000", "DATABASE_SCHEMA": "dev_x", "MONGODB_DATABASE": "",
                           "DATABASE_URL": "postgres://h/db"})
    assert p.process_isolation_vars() == ["DATABASE_SCHEMA", "MOMENTRY_SERVER_PORT"]
    assert project(tmp_path).process_isolation_vars() == []


def test_a_project_gathers_every_secret_for_scrubbing(tmp_path: Path) -> None:
    from momentry_db.environments import SecretURL

    (tmp_path / ".env").write_text("DATABASE_URL=postgresql://u:prodpw@h/db\nMONGODB_DATABASE=momentry\n")
    (tmp_path / ".env.development").write_text("REDIS_URL=redis://:devpw@r/0\nQDRANT_API_KEY=\n")
    (tmp_path / "extra.env").write_text("MONGODB_URL=mongodb://u:mongopw@h/\nQDRANT_URL=http://q:6333\n")
    (tmp_path / "bad.env").write_text('QDRANT_API_KEY=k-bad\nA="unclosed\n')
    p = project(tmp_path, {"QDRANT_API_KEY": "k-proc", "DATABASE_URL": "postgresql://u:prodpw@h/db"})
    found = ["prodpw", SecretURL("postgresql://u:prodpw@h/db"), "k-proc", "devpw", SecretURL("redis://:devpw@r/0")]
    assert p.secrets() == found
    assert p.secrets([tmp_path / "extra.env", tmp_path / "bad.env", tmp_path / "missing.env"]) == [
        *found, "mongopw", SecretURL("mongodb://u:mongopw@h/")]
    (tmp_path / "bare").mkdir()
    assert project(tmp_path / "bare").secrets() == []


@pytest.mark.parametrize("schema, name", [("public", "prod"), ("dev", "dev"), ("qa_one", "qa")])
def test_an_environment_is_found_by_its_schema(tmp_path: Path, schema: str, name: str) -> None:
    p = project(tmp_path, toml='[environments]\nqa = { schema = "qa_one" }\n')
    assert p.registry.by_schema(schema).name == name


def test_a_schema_no_environment_has_lists_the_known_ones(tmp_path: Path) -> None:
    p = project(tmp_path, toml='[environments]\nqa = { schema = "qa_one" }\n')
    with pytest.raises(ConfigError) as info:
        p.registry.by_schema("qa")
    assert str(info.value) == "schema 'qa' belongs to no configured environment; known: public (prod), dev (dev), " \
                              "qa_one (qa)"


def test_a_name_may_not_reach_an_environment_declared_after_it(tmp_path: Path) -> None:
    p = project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "staging"})
    with pytest.raises(ConfigError) as info:
        p.environment("dev", overrides={"MONGODB_DATABASE": "momentry_staging"})
    assert str(info.value) == ("dev's MongoDB database 'momentry_staging' reaches environment staging's "
                               "'momentry_staging'; check DATABASE_SCHEMA / MONGODB_DATABASE / QDRANT_COLLECTION / "
                               "MOMENTRY_REDIS_PREFIX for dev")


@pytest.mark.parametrize("validate, value, refusal", [
    (validate_mongo_database, "9db", "invalid MongoDB database name '9db': use [a-z_][a-z0-9_]*, at most 63 bytes"),
    (validate_collection, "C", "invalid Qdrant collection name 'C': use [a-z_][a-z0-9_-]*"),
    (lambda v: validate_schema(v, primary=False), "9dev",
     "invalid schema name '9dev': a schema is [a-z_][a-z0-9_]* (lowercase, unquoted)"),
    (lambda v: validate_schema(v, primary=False), "a" * 64, f"invalid schema name '{'a' * 64}': longer than "
                                                            "PostgreSQL's 63 bytes"),
    (lambda v: validate_schema(v, primary=False), "public",
     "schema 'public' belongs to prod: another environment may not use it"),
    (lambda v: validate_schema(v, primary=True), "dev",
     "prod's schema must be 'public', not 'dev': unset DATABASE_SCHEMA or set it to public for prod"),
    (validate_redis_prefix, "m*:", "invalid Redis prefix 'm*:': use [a-z_][a-z0-9_.:-]* ending in ':'"),
])
def test_a_refused_store_name_is_quoted_with_the_rule(validate, value: str, refusal: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(value)
    assert str(info.value) == refusal


@pytest.mark.parametrize("variable, url, refusal", [
    ("MONGODB_URL", "localhost:27017", "MONGODB_URL 'localhost:27017' has no scheme; use mongodb:// or mongodb+srv://"),
    ("REDIS_URL", "r:6379/0", "REDIS_URL 'r:6379/0' has no scheme; use redis://, rediss:// or unix://"),
    ("QDRANT_URL", "q:6333", "QDRANT_URL 'q:6333' has no scheme; use http:// or https://"),
    ("DATABASE_URL", "mysql://u:pw@h/db", "DATABASE_URL 'mysql://u:***@h/db' is not a PostgreSQL URL; use "
                                          "postgres://, postgresql:// or postgresql+psycopg://"),
    ("REDIS_URL", "redis://:pa/ss@r:5x/0", "REDIS_URL 'redis://:***@r:5x/0': port '5x' is not a number between 0 and "
                                           "65535"),
    ("REDIS_URL", "redis://r/0?bogus=", "REDIS_URL 'redis://r/0?bogus=': unknown parameter 'bogus'; remove it or use "
                                        "one redis-py knows"),
    ("QDRANT_URL", "http://q:6333/?x=", "QDRANT_URL 'http://q:6333/?x=': unknown parameter 'x'; a Qdrant URL takes "
                                        "none (put the API key in QDRANT_API_KEY)"),
    ("MONGODB_URL", "MongoDB://h:27017/", None),
    ("REDIS_URL", "redis://:pw@[::1]:6379/0", None),
    ("QDRANT_URL", "http://[::1]:6333", None),
    ("DATABASE_URL", "postgresql://u:pw@h/db", None),
])
def test_a_url_is_refused_for_its_scheme_port_or_parameters(variable: str, url: str, refusal: str | None) -> None:
    from momentry_db.settings import check_url

    if refusal is None:
        assert check_url(variable, url) == url
    else:
        with pytest.raises(ConfigError) as info:
            check_url(variable, url)
        assert str(info.value) == refusal


def test_without_an_environ_the_process_environment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOMENTRY_EXTRA_ENVS", "qa")
    monkeypatch.setenv("MOMENTRY_STATE_DIR", str(tmp_path / "state"))
    p = load_project(tmp_path)
    assert (p.registry.names, p.state_dir) == (("prod", "dev", "qa"), tmp_path / "state")


def test_an_unknown_environment_says_where_to_declare_more() -> None:
    from momentry_db.environments import Registry

    with pytest.raises(ConfigError) as info:
        Registry().get("qa")
    assert str(info.value) == ("unknown environment 'qa'; known: prod, dev (declare more in momentry-db.toml "
                               "[environments] or MOMENTRY_EXTRA_ENVS)")


def test_a_config_file_without_environments_declares_none(tmp_path: Path) -> None:
    assert project(tmp_path, toml="[tool]\nx = 1\n").registry.names == ("prod", "dev")
    assert project(tmp_path, toml="").registry.names == ("prod", "dev")


@pytest.mark.parametrize("toml, refusal", [
    ("environments = 3\n", "momentry-db.toml: [environments] must be a table"),
    ("[environments]\nstaging = 3\n", "momentry-db.toml [environments.staging]: must be a table, for example "
                                       "staging = {}"),
    ('[environments]\nstaging = { colour = "red" }\n', "momentry-db.toml [environments.staging]: unknown key "
                                                       "'colour'; known: schema, database, collection, prefix, "
                                                       "env_file, port, role"),
    ('[environments]\nstaging = { port = true }\n', "momentry-db.toml [environments.staging]: port must be a int"),
    ('[environments]\nstaging = { schema = "Bad" }\n',
     "momentry-db.toml [environments.staging]: invalid schema name 'Bad': a schema is [a-z_][a-z0-9_]* (lowercase, "
     "unquoted)"),
    ('[environments]\n"Bad" = {}\n', "momentry-db.toml [environments]: invalid environment name 'Bad': use "
                                      "lowercase letters, digits, '-' or '_' (at most 40 characters, starting with "
                                      "a letter)"),
    ('[environments]\nstaging = { database = "momentry_dev" }\n',
     "environments dev and staging would share the MongoDB database 'momentry_dev' / 'momentry_dev'"),
    ('[environments]\nstaging = { env_file = "./.env" }\n',
     "environments prod and staging would share the env file '.env' / './.env'"),
    ('[environments]\na = { collection = "shared__v1" }\nb = { collection = "shared" }\n',
     "environments a and b would share the Qdrant collection 'shared__v1' / 'shared'"),
    ('[environments]\na = { prefix = "x:y:" }\nb = { prefix = "x:" }\n',
     "environments a and b would share the Redis prefix 'x:y:' / 'x:'"),
])
def test_a_bad_declaration_is_refused_naming_the_file_and_the_environment(tmp_path: Path, toml: str,
                                                                         refusal: str) -> None:
    with pytest.raises(ConfigError) as info:
        project(tmp_path, toml=toml)
    assert str(info.value) == refusal


def test_an_env_file_that_links_to_another_environments_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("")
    (tmp_path / ".env.staging").symlink_to(tmp_path / ".env")
    with pytest.raises(ConfigError) as info:
        project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "staging"})
    assert str(info.value) == (f"environments prod and staging would share the env file '.env' / '.env.staging' "
                               f"(both are '{tmp_path / '.env'}'); set env_file in momentry-db.toml to a file of "
                               "its own")


FAST = settings(max_examples=200, deadline=None)
_NAME_PIECES = st.sampled_from(["a", "b", "x", "_", "__", ":", "./", "v1"])


@FAST
@given(label=st.sampled_from([label for label, _ in NAME_KINDS]),
       values=st.lists(st.lists(_NAME_PIECES, min_size=1, max_size=4).map("".join), min_size=1, max_size=12),
       probe=st.lists(_NAME_PIECES, min_size=1, max_size=4).map("".join))
def test_the_name_index_finds_exactly_the_names_that_clash_pairwise(label: str, values: list[str], probe: str) -> None:
    index = NameIndex(label, values)
    for value in [*values, probe]:
        assert index.clashing(value) == [i for i, other in enumerate(values) if names_clash(label, value, other)]


def test_three_hundred_environments_are_checked_for_clashes_and_one_clash_is_still_named(tmp_path: Path) -> None:
    many = ",".join(f"e{i:03d}" for i in range(300))
    assert len(project(tmp_path, {"MOMENTRY_EXTRA_ENVS": many}).registry.names) == 302
    (tmp_path / "momentry-db.toml").write_text('[environments]\nlate = { prefix = "momentry_e123:x:" }\n')
    with pytest.raises(ConfigError) as info:
        project(tmp_path, {"MOMENTRY_EXTRA_ENVS": many}, toml=None)
    assert str(info.value) == ("environments late and e123 would share the Redis prefix 'momentry_e123:x:' / "
                               "'momentry_e123:'")
